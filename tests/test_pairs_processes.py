"""make-pairs across processes: 1 and 2 ranks make the same set; a SIGKILL mid-shard and a
rerun of the same command end with a complete, verified set and nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, launch_command, launch_env, run_dmd
from dmdcli.teachers.gmm import GMMTeacher
from dmdcli.pairs import verify_pairs
from dmdcli.recipe import GMMConfig

ARGS = ["make-pairs", "--teacher", "gmm", "--set", "teacher.gmm.conditional=true", "--steps", "5"]


def shards(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"]
    return [(r["start"], r["count"], r["sha256"]) for r in manifest["shards"]]


def test_one_and_two_processes_make_the_same_pairs(tmp_path):
    one = run_dmd(*ARGS, "--num", "90", "--shard-size", "16", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(launch_command(*ARGS, "--num", "90", "--shard-size", "16", "--out", tmp_path / "two"),
                         cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(shards(tmp_path / "one")) == 6
    assert shards(tmp_path / "one") == shards(tmp_path / "two")


def test_sigkill_mid_shard_then_rerun_completes(tmp_path):
    out = tmp_path / "p"
    cmd = [*ARGS, "--num", "30000", "--shard-size", "3000", "--batch-size", "500", "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "dmdcli", *map(str, cmd)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "shard-00001.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)                                  # into the middle of the next shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "shard-00009.json").exists(), "finished before the kill"
    again = run_dmd(*cmd)
    assert again.returncode == 0, again.stderr
    assert len(shards(out)) == 10
    assert [p.name for p in out.glob(".*")] == [".lock"]   # no temporary file left, only the lock
    teacher = GMMTeacher(GMMConfig(conditional=True))
    assert verify_pairs(out, teacher, count=30, seed=1) == []
