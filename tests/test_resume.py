"""A run killed after a checkpoint and rerun with the same command ends bitwise equal to an
uninterrupted run (CPU); a changed recipe is refused rather than mixed in."""

import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import ROOT, dmd_here


def final_weights(run_dir, steps):
    ckpt = run_dir / "checkpoints" / f"step-{steps:08d}"
    return {name: load_file(str(ckpt / f"{name}.safetensors"))
            for name in ("generator", "critic", "state", "generator_ema", "critic_ema") if (ckpt / f"{name}.safetensors").is_file()}


def assert_bitwise_equal(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k].dtype == b[name][k].dtype
            assert a[name][k].shape == b[name][k].shape and (a[name][k] == b[name][k]).all(), (name, k)


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def test_killed_run_resumes_bitwise(tmp_path, tiny_recipe):
    steps = 400
    # The rates decay from iteration 20 on, so the kill (at 50 or later) lands mid-decay.
    both = "ema_decay = 0.99\ncritic_ema_decay = 0.9\nlr_decay_steps = 380\n"
    straight = tiny_recipe("straight", steps=steps, checkpoint_every=25, extra=both)
    killed = tiny_recipe("killed", steps=steps, checkpoint_every=25, extra=both)
    done = dmd_here("distill", straight)   # in this process; the killed run is a process of its own
    assert done.returncode == 0, done.stderr

    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dmdcli", "distill", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step-00000050").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / f"step-{steps:08d}").exists(), "the run finished before the kill"
    assert (run_dir / "checkpoints" / "step-00000050").exists()

    again = dmd_here("distill", killed)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    reference = final_weights(tmp_path / "runs" / "straight", steps)
    assert {"generator_ema", "critic_ema"} <= reference.keys()   # the EMAs resume bitwise too
    assert_bitwise_equal(reference, final_weights(run_dir, steps))
    assert metrics(tmp_path / "runs" / "straight") == metrics(run_dir)
    # Rotation kept only the newest two checkpoints, and no temporary folder is left.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [f"step-{steps - 25:08d}", f"step-{steps:08d}"]


def test_rerun_of_finished_run_is_a_no_op_and_longer_run_continues(tmp_path, tiny_recipe, capsys):
    from dmdcli.cli import main

    path = tiny_recipe(steps=20, checkpoint_every=10)
    assert main(["distill", str(path)]) == 0
    assert main(["distill", str(path)]) == 0
    assert "already complete at step 20" in capsys.readouterr().err
    # Extending train.steps is allowed and continues from step 20.
    assert main(["distill", str(path), "--set", "train.steps=30"]) == 0
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000030").is_dir()


def test_a_second_command_on_a_busy_run_is_refused_and_writes_nothing(tmp_path, tiny_recipe, capsys):
    from dmdcli.cli import main
    from dmdcli.utils.io import try_lock

    path = tiny_recipe(steps=10, checkpoint_every=10)
    assert main(["distill", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    held = try_lock(run_dir)   # as a running `dmd distill` of this folder holds it
    assert held is not None
    capsys.readouterr()
    assert main(["distill", str(path), "--set", "train.steps=20"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is in use by another `dmd distill` (process {os.getpid()}); let it finish" in err.replace("\n", "")
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before
    held.close()   # the first command ends: the same command now continues
    assert main(["distill", str(path), "--set", "train.steps=20"]) == 0
    assert (run_dir / "checkpoints" / "step-00000020").is_dir()


def test_the_run_lock_dies_with_its_process_even_on_sigkill(tmp_path):
    from dmdcli.utils.io import try_lock

    code = ("import sys, time; from pathlib import Path; from dmdcli.utils.io import try_lock; "
            "held = try_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert try_lock(tmp_path) is None
        assert (tmp_path / ".lock").read_text().strip() == str(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    held = try_lock(tmp_path)
    assert held is not None
    held.close()


def test_changed_recipe_is_refused(tmp_path, tiny_recipe, capsys):
    from dmdcli.cli import main

    path = tiny_recipe(steps=10, checkpoint_every=10)
    assert main(["distill", str(path)]) == 0
    capsys.readouterr()
    assert main(["distill", str(path), "--set", "train.lr_critic=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different recipe (train.lr_critic: 0.001 there, 0.5 now)" in err
    assert f"--set run.out={tmp_path / 'runs' / 'tiny'}-2" in err.replace("\n", "")


def test_a_decaying_run_keeps_its_length(tmp_path, tiny_recipe, capsys):
    """train.steps may grow on resume, except under train.lr_decay_steps: the decay ends at
    train.steps, so another length would send a finished rate from zero back to its peak."""
    from dmdcli.cli import main

    path = tiny_recipe(steps=20, checkpoint_every=10, extra="lr_decay_steps = 4\n")
    assert main(["distill", str(path)]) == 0
    capsys.readouterr()
    assert main(["distill", str(path), "--set", "train.steps=30"]) == 2
    assert "holds a run with a different recipe (train.steps: 20 there, 30 now)" in capsys.readouterr().err


def test_saved_recipe_reruns_the_same_run(tmp_path, tiny_recipe):
    """recipe.toml in the run folder is the resolved recipe and itself a valid recipe."""
    from dmdcli.recipe import load_recipe, to_dict

    path = tiny_recipe(steps=10, checkpoint_every=10)
    assert dmd_here("distill", path).returncode == 0
    saved = tmp_path / "runs" / "tiny" / "recipe.toml"
    assert to_dict(load_recipe(saved)) == to_dict(load_recipe(path))
    dry = dmd_here("distill", path, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith(saved.read_text())
    estimate = dry.stdout[len(saved.read_text()):].strip().splitlines()   # then the cost, as TOML comments
    assert estimate and all(line.startswith("# ") for line in estimate)


def test_half_written_metrics_line_is_dropped_on_resume(tmp_path, tiny_recipe):
    from dmdcli.cli import main

    path = tiny_recipe(steps=20, checkpoint_every=10)
    assert main(["distill", str(path), "--set", "train.steps=10"]) == 0
    log = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 12, "loss_crit')      # a kill in the middle of a write
    assert main(["distill", str(path)]) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [10, 20]


def test_checkpoint_of_an_earlier_version_resumes(tmp_path, tiny_recipe):
    """Checkpoints written before the state held num_processes, scaler and ema still resume."""
    from dmdcli.cli import main
    from dmdcli.utils.io import sha256

    path = tiny_recipe(steps=10, checkpoint_every=10)
    assert main(["distill", str(path)]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000010"
    state = json.loads((ckpt / "state.json").read_text())
    state["__dict__"] = [kv for kv in state["__dict__"] if kv[0] not in ("num_processes", "scaler", "ema")]
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.json"] = sha256(ckpt / "state.json")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["distill", str(path), "--set", "train.steps=20"]) == 0
    assert (ckpt.parent / "step-00000020").is_dir()
