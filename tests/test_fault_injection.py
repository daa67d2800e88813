"""Fault injection: `distill` and `make-pairs` SIGKILLed at several seeded random moments,
each time rerun with the same command, end bitwise equal to an uninterrupted run with no
file left corrupt or half-written."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_dmd
from dmdcli.utils import checkpoint

KILLS = 3


def start(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "dmdcli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_at_random_moments(args, progressed, seed):
    """Start `args` KILLS times; each time wait until `progressed()` says work is under way,
    then a seeded random extra delay, then SIGKILL. Returns how many kills landed mid-run."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(KILLS):
        proc = start(args)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not progressed():
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
    return landed


def new_files(folder, pattern):
    """progressed() for kill_at_random_moments: true once more files match than at its last call."""
    seen = {"n": 0}

    def progressed():
        n = len(list(folder.glob(pattern)))
        if n > seen["n"]:
            seen["n"] = n
            return True
        return False
    return progressed


def no_temporaries(folder):
    # .lock is the run's lock file: it stays (the lock is the flock on it, which dies with its process).
    return [p for p in folder.rglob("*") if (p.name.startswith(".") and p.name != ".lock") or ".tmp" in p.name]


def test_distill_survives_random_kills(tmp_path, tiny_recipe):
    steps = 600
    reference = tiny_recipe("reference", steps=steps, checkpoint_every=15)
    victim = tiny_recipe("victim", steps=steps, checkpoint_every=15)
    assert run_dmd("distill", reference).returncode == 0
    run_dir = tmp_path / "runs" / "victim"
    seen = {"n": 0}

    def progressed():   # a new checkpoint since the last start
        n = len(checkpoint.list_checkpoints(run_dir))
        steps_now = checkpoint.step_of(checkpoint.list_checkpoints(run_dir)[-1]) if n else 0
        if steps_now > seen["n"]:
            seen["n"] = steps_now
            return True
        return False

    landed = kill_at_random_moments(["distill", victim], progressed, seed=2024)
    assert landed >= 2
    final = run_dmd("distill", victim)
    assert final.returncode == 0, final.stderr
    for name in ("generator", "critic", "state"):
        a = load_file(str(tmp_path / "runs" / "reference" / "checkpoints" / f"step-{steps:08d}" / f"{name}.safetensors"))
        b = load_file(str(run_dir / "checkpoints" / f"step-{steps:08d}" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    assert all(checkpoint.verify(c) is None for c in checkpoint.list_checkpoints(run_dir))
    assert no_temporaries(run_dir) == []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)   # no half-written line survives


def test_make_pairs_survives_random_kills(tmp_path):
    args = ["make-pairs", "--teacher", "gmm", "--num", "24000", "--shard-size", "2000", "--batch-size", "500",
            "--steps", "40"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert run_dmd(*args, "--out", reference).returncode == 0
    # Each kill waits for one more finished shard since the last start.
    landed = kill_at_random_moments([*args, "--out", victim], new_files(victim, "shard-*.json"), seed=7)
    assert landed >= 2
    final = run_dmd(*args, "--out", victim)
    assert final.returncode == 0, final.stderr
    a = json.loads((reference / "manifest.json").read_text())
    b = json.loads((victim / "manifest.json").read_text())
    assert b["complete"] and a["shards"] == b["shards"]          # same files, bitwise (sha256)
    assert run_dmd("pairs-check", victim).returncode == 0
    assert no_temporaries(victim) == []


def test_sample_survives_random_kills_and_resumes_from_its_batches(tmp_path):
    """`dmd sample` SIGKILLed at seeded random moments, then rerun: the kept batches are read
    back, not made again, and the files equal an uninterrupted call's bitwise. Rerun with
    another seed instead, none of them is used."""
    import shutil

    from tiny_models import save_tiny_unet2d

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    args = ["sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", 48,
            "--teacher-steps", 15, "--batch-size", 2, "--guidance", 2]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert run_dmd(*args, "--out", reference).returncode == 0
    # Each kill waits for one more kept batch since the last start.
    landed = kill_at_random_moments([*args, "--out", victim], new_files(victim, ".partial/*/*.safetensors"), seed=11)
    assert landed >= 2
    kept = sorted(victim.glob(".partial/*/*.safetensors"))
    assert 0 < len(kept) < 24
    # Mark one kept batch: if it is read back, not made again, the marks reach the samples file.
    start, stop = map(int, kept[0].stem.split("-"))
    save_file({"x": torch.full_like(load_file(str(kept[0]))["x"], 7.0)}, str(kept[0]))
    other = tmp_path / "other-seed"
    shutil.copytree(victim, other)
    assert run_dmd(*args, "--seed", 1, "--out", other).returncode == 0
    assert not (load_file(str(other / "samples.safetensors"))["x"] == 7).any() and no_temporaries(other) == []
    final = run_dmd(*args, "--out", victim)
    assert final.returncode == 0, final.stderr
    a, b = load_file(str(reference / "samples.safetensors")), load_file(str(victim / "samples.safetensors"))
    assert (b["x"][start:stop] == 7).all()
    b["x"][start:stop] = a["x"][start:stop]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)   # the rest: bitwise the same
    assert no_temporaries(victim) == []   # .partial is gone once the files are written
