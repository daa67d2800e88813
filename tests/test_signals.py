"""SIGTERM/SIGINT: finish the step, write a checkpoint, exit 128+signal; the rerun resumes."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_dmd
from dmdcli.utils import checkpoint


def start(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "dmdcli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not path.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), "the run never got there"


def test_sigterm_during_distill_checkpoints_and_resumes(tmp_path, tiny_recipe):
    recipe = tiny_recipe(steps=100000, checkpoint_every=20)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start("distill", recipe)
    wait_for(run_dir / "checkpoints" / "step-00000020", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = checkpoint.latest_valid(run_dir)
    step = checkpoint.step_of(last)
    assert step > 20                    # a checkpoint at the stop step itself, past the last periodic one
    assert f"stopped at step {step} with a checkpoint; run the same command again to resume" in err
    assert "Traceback" not in err
    again = run_dmd("distill", recipe, "--set", f"train.steps={step + 3}")
    assert again.returncode == 0 and f"resuming {run_dir} from step-{step:08d}" in again.stderr


def test_sigint_during_make_pairs_keeps_finished_shards(tmp_path):
    out = tmp_path / "p"
    args = ["make-pairs", "--teacher", "gmm", "--num", "2000000", "--out", out, "--shard-size", "256",
            "--batch-size", "64", "--steps", "50"]
    proc = start(*args)
    wait_for(out / "shard-00000.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert f"stopped; {out} keeps its finished shards" in err
    assert not list(out.glob(".*tmp*"))
    finished = sorted(p.name for p in out.glob("shard-*.json"))
    assert finished and all((out / n.replace(".json", ".safetensors")).is_file() for n in finished)
