"""Two processes under `accelerate launch` (DDP over gloo on CPU): both ranks train, the
checkpoint holds each rank's RNG, the rerun resumes, and two processes at batch b train as
one process at batch 2b."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_command, launch_env
from dmdcli.utils import checkpoint


def launch(recipe, *extra, command="distill"):
    cmd = launch_command(command, *([recipe, *extra] if recipe else extra))
    return subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
def test_two_process_distill_resumes_to_the_uninterrupted_run(tmp_path, tiny_recipe):
    """A two-process run stopped after its step-10 checkpoint and rerun ends, at step 20, with
    the weights, optimiser states and RNG of the same run left uninterrupted, to the bit."""
    recipe = tiny_recipe(steps=20, checkpoint_every=10)
    first = launch(recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    names = sorted(p.name for p in (ckpts / "step-00000010").iterdir())
    assert "rng-rank0.safetensors" in names and "rng-rank1.safetensors" in names
    r0, r1 = (load_file(str(ckpts / "step-00000010" / f"rng-rank{r}.safetensors")) for r in (0, 1))
    assert all((r0[k] == r1[k]).all() for k in r0)   # every rank draws the global batch and keeps its slice
    (ckpts / "step-00000020").rename(tmp_path / "uninterrupted")   # as if stopped after step 10
    second = launch(recipe)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr
    resumed = sorted(p.name for p in (ckpts / "step-00000020").iterdir())
    assert resumed == sorted(p.name for p in (tmp_path / "uninterrupted").iterdir())
    for name in resumed:
        if name.endswith(".safetensors"):
            a, b = (load_file(str(d / name)) for d in (ckpts / "step-00000020", tmp_path / "uninterrupted"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # One process cannot continue a two-process run: it would silently differ.
    from conftest import run_dmd

    single = run_dmd("distill", recipe, "--set", "train.steps=30")
    assert single.returncode == 2
    assert "was written by 2 process(es) and this run has 1; resume with the same number" in single.stderr


def rank_pids(recipe) -> dict[int, int]:
    """The launched processes running `recipe`, by their RANK (the launcher itself has none)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        if str(recipe).encode() in cmdline and b"RANK" in env:
            pids[int(env[b"RANK"])] = int(proc.name)
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint(tmp_path, tiny_recipe):
    """A scheduler that signals one process only: the request reaches the others with the next
    finite check, and all of them write one checkpoint at the same step and stop (one rank
    alone would leave the other waiting in a collective)."""
    recipe = tiny_recipe(steps=100000, checkpoint_every=10)
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(launch_command("distill", recipe), cwd=ROOT, env=launch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step-00000010").exists() \
            and proc.poll() is None:
        time.sleep(0.05)
    pids = rank_pids(recipe)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a rank kept waiting: the stop did not reach every process")
    last = checkpoint.latest_valid(run_dir)
    step = checkpoint.step_of(last)
    assert step > 10, step   # written for the stop (signalled after the step-10 checkpoint)
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {p.name for p in last.iterdir()}
    assert f"stopped at step {step} with a checkpoint; run the same command again to resume" in err


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
def test_a_run_folder_the_processes_do_not_share_is_refused(tmp_path, tiny_recipe):
    """Two nodes, each with its own disk at the run folder's path: the two processes are
    started as a launcher on two nodes would start them, each in its own working directory,
    with a relative run.out. Both refuse at start-up with one line, instead of failing at the
    first checkpoint on a folder only one node has; neither leaves a checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tiny_recipe(steps=4, checkpoint_every=2)
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = {**launch_env(), "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "dmdcli", "distill", str(recipe), "--set",
                                       'run.out="runs/tiny"'], cwd=node, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    says = ("runs/tiny is not one folder for all 2 processes: some do not see what process 0 writes there "
            "(a local disk on each node?); put it on a file system that every node shares")
    for code, err in results:
        assert code == 2 and says in err.replace("\n", "") and "Traceback" not in err, err[-2000:]
    assert not list(tmp_path.glob("node*/runs/tiny/checkpoints/*"))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
def test_two_ranks_sample_the_same_set_as_one(tmp_path, tiny_recipe):
    """Labels and noise by global index: 2 processes write the same (label, sample) files as 1,
    and no part file is left behind."""
    from conftest import run_dmd

    path = tiny_recipe(steps=4, checkpoint_every=4)
    path.write_text(path.read_text().replace("[teacher.gmm]\n", "[teacher.gmm]\nconditional = true\n"))
    assert run_dmd("distill", path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    args = ["--num", "11", "--batch-size", "4", "--teacher-steps", "3"]
    one = run_dmd("sample", run, *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = launch(run, *args, "--out", tmp_path / "two", command="sample")
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("samples.safetensors", "teacher.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and "label" in a
        assert a["label"].tolist() == b["label"].tolist() == [i % 8 for i in range(11)]
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".lock", "samples.png", "samples.safetensors",
                                                                     "teacher.safetensors"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
def test_two_processes_train_like_one_with_twice_the_batch(tmp_path, tiny_recipe):
    """DMD2 with the GAN (exact real samples): generator and critic after 12 iterations agree
    to float rounding (0.1% of how far the generator moved), whatever the split of the global
    batch (measured: 1.5e-8 and 7e-8)."""
    extra = "\n[gan]\ngenerator_weight = 3e-3\ncritic_weight = 1e-2\n"
    one = tiny_recipe("one", steps=12, checkpoint_every=12, extra=extra)
    one.write_text(one.read_text().replace("batch_size = 64", "batch_size = 128"))
    two = tiny_recipe("two", steps=12, checkpoint_every=12, extra=extra)
    from conftest import run_dmd

    first = run_dmd("distill", one)
    assert first.returncode == 0, first.stderr
    second = launch(two)
    assert second.returncode == 0, second.stderr[-3000:]
    import torch

    from dmdcli.recipe import load_recipe
    from dmdcli.teachers import build_teacher

    teacher = build_teacher(load_recipe(one).teacher)
    torch.manual_seed(0)   # the initial weights, as the trainer makes them (run.seed 0)
    start = teacher.make_generator().state_dict()
    def weights(run, net):
        return load_file(str(tmp_path / "runs" / run / "checkpoints" / "step-00000012" / f"{net}.safetensors"))

    a, b = weights("one", "generator"), weights("two", "generator")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and differ < 1e-3 * moved, (moved, differ)
    c, d = weights("one", "critic"), weights("two", "critic")
    assert max((c[k] - d[k]).abs().max().item() for k in c) < 1e-3 * moved


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on Linux")
@pytest.mark.parametrize("command, args, says", [
    ("compare", ["--out", "{tmp}/c", "--ref", "gmm"],
     "compare runs in one process; under accelerate launch, run `dmd sample` for each student"),
    ("fid", ["--from", "{tmp}/run", "--ref", "gmm"],
     "fid --from runs in one process; under accelerate launch, run `dmd sample` and then `dmd fid` on its folder"),
])
def test_commands_that_measure_on_one_process_refuse_a_launch_of_two(tmp_path, command, args, says):
    """compare and fid --from measure on the main process only: launched on two, they say what
    to run instead (compare used to fail with a KeyError on the second rank)."""
    extra = [tmp_path / "run"] if command == "compare" else []
    done = launch(None, *extra, *[a.format(tmp=tmp_path) for a in args], command=command)
    # A rank exits 2 with one line (the launcher may stop the other first); the traceback there
    # is torch's launcher reporting that.
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert f'File "{ROOT / "dmdcli"}' not in done.stderr
    assert says in done.stderr.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nothing written
