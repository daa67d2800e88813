"""`make demo`'s steps (the Makefile's demo-steps target, the README's first command) on the
shipped Fashion-MNIST EDM teacher at a tiny size: every step runs, the table and grid appear,
and the shipped student measures as a one-step generator should."""

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
    # Three iterations at batch 4, 40 samples a row: the demo's commands, tiny.
    tiny = ("--set train.steps=3 --set train.batch_size=4 --set run.checkpoint_every=3 "
            "--set run.preview_samples=4 --set run.log_with=none")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["make", "--no-print-directory", "demo-steps", f"DMD={dmd}", f"DEMO={demo}",
                           "DEMO_NUM=40", f"DEMO_SET={tiny}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((demo / "compare" / "compare.json").read_text())
    rows = [(r["who"], r["steps"]) for r in report["rows"]]
    assert rows == [("student", 1), ("student", 1), ("teacher", 1), ("teacher", 4), ("teacher", 18)]
    assert all(r["num_samples"] == 40 and r["class_accuracy"] is not None for r in report["rows"])
    assert all(r["reference"].endswith("fashion-mnist-test-stats.npz") for r in report["rows"])
    assert report["rows"][0]["checkpoint_step"] == 3
    # The shipped student (the benchmark's run) against the teacher on the same 40 noises: far
    # ahead of the teacher's one step, and of this 3-iteration run (still the teacher at one
    # step); near the teacher's 18 steps in class accuracy. A broken or untrained shipped
    # student, or sampling that ignores its sigma, fails here.
    short, shipped, t1, t4, t18 = report["rows"]
    assert shipped["fid"] < 0.5 * t1["fid"] and shipped["fid"] < 0.5 * short["fid"] and shipped["fid"] < t4["fid"]
    assert shipped["class_accuracy"] >= t18["class_accuracy"] - 0.15 and shipped["class_accuracy"] > t1["class_accuracy"]
    assert shipped["checkpoint_step"] == 5000   # recipes/fashion.toml's last step
    for png in [demo / "compare" / "grid.png", demo / "samples" / "samples.png",
                demo / "student" / "previews" / "step-00000003.png"]:
        assert png.read_bytes()[:4] == b"\x89PNG", png
    # The table on stdout has every row and column the issue names, and no warning is printed.
    for text in ["FID", "class accuracy", "images/s", "student", "teacher"]:
        assert text in done.stdout, text
    from dmdcli.evaluation.compare import rows_for_table

    assert [row[0] for row in rows_for_table(report["rows"])] == [
        "student (1 step)", "student fashion-mnist-dmd2 (1 step)", "teacher (1 step, heun, guidance 1.0)",
        "teacher (4 steps, heun, guidance 1.0)", "teacher (18 steps, heun, guidance 1.0)"]
    assert "Warning" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
