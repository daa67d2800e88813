"""`make demo`'s steps (the Makefile's demo-steps target, the README's first command) on the
shipped Fashion-MNIST teacher at a tiny size: every step runs and the table and grid appear."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_steps_make_the_table_and_grid(tmp_path):
    demo = tmp_path / "demo"
    dmd = f"{sys.executable} -m dmdcli"
    # Three iterations at batch 4, 4 pairs, 8 samples a row: the demo's commands, tiny.
    tiny = ("--set train.steps=3 --set train.batch_size=4 --set run.checkpoint_every=3 "
            "--set run.preview_samples=4 --set run.log_with=none")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["make", "--no-print-directory", "demo-steps", f"DMD={dmd}", f"DEMO={demo}",
                           "DEMO_PAIRS=4", "DEMO_NUM=8", f"DEMO_SET={tiny}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((demo / "compare" / "compare.json").read_text())
    rows = [(r["who"], r["steps"]) for r in report["rows"]]
    assert rows == [("student", 1), ("teacher", 1), ("teacher", 4), ("teacher", 50)]
    assert all(r["num_samples"] == 8 and r["class_accuracy"] is not None and r["fid"] > 0 for r in report["rows"])
    assert all(r["reference"].endswith("fashion-mnist-test-stats.npz") for r in report["rows"])
    assert report["rows"][0]["checkpoint_step"] == 3
    for png in [demo / "compare" / "grid.png", demo / "samples" / "samples.png",
                demo / "student" / "previews" / "step-00000003.png"]:
        assert png.read_bytes()[:4] == b"\x89PNG", png
    manifest = json.loads((demo / "pairs" / "manifest.json").read_text())
    assert (manifest["num"], manifest["guidance"], manifest["steps"]) == (4, 2.0, 50)   # the recipe's guidance
    # The table on stdout has every row and column the issue names.
    for text in ["FID", "class accuracy", "images/s", "student", "teacher"]:
        assert text in done.stdout, text
