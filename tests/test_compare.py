"""`dmd compare`: student and teacher rows measured the same way, a table, JSON and a grid."""

import json

import pytest
import torch

from conftest import dmd_here, run_dmd
from tiny_models import save_tiny_unet2d, unet2d_recipe


def test_compare_measures_student_and_teacher_rows_alike(tmp_path):
    teacher = save_tiny_unet2d(tmp_path / "teacher")
    recipe = unet2d_recipe(tmp_path / "r.toml", teacher, tmp_path / "run", steps=2)
    assert dmd_here("distill", recipe).returncode == 0
    # The reference: the teacher's own 2-step samples from the same seed, so its 2-step row is ~0.
    ref = tmp_path / "ref"
    made = dmd_here("sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", 12,
                   "--teacher-steps", 2, "--guidance", 2, "--out", ref)
    assert made.returncode == 0, made.stderr
    result = dmd_here("compare", tmp_path / "run", "--out", tmp_path / "cmp", "--ref", ref / "samples.safetensors",
                     "--num", 12, "--teacher-steps", "2,1", "--features", "fashion", "--batch-size", 6)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {(r["who"], r["steps"]): r for r in report["rows"]}
    assert list(rows) == [("student", 1), ("teacher", 1), ("teacher", 2)]
    assert abs(rows[("teacher", 2)]["fid"]) < 1e-3 and rows[("teacher", 1)]["fid"] > 1e-2
    assert all(r["class_accuracy"] is not None and r["num_samples"] == 12 for r in rows.values())
    assert all(r["within_class_spread"] > 0 for r in rows.values())   # random weights: nothing has collapsed
    assert rows[("teacher", 2)]["guidance"] == 2.0 and rows[("student", 1)]["sampler"] is None
    assert (tmp_path / "cmp" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "class accuracy" in result.stdout and "images/s" in result.stdout and "spread" in result.stdout
    assert "x the teacher's images per second at 2 steps" in result.stderr
    # The student's row measures that run's own one-step samples: `dmd sample` of the run at the
    # same seed gives the very samples compare kept, and `dmd fid` of them the row's FID and
    # class accuracy. A compare that sampled the teacher, another run or the raw weights, or
    # measured another row's samples, fails here.
    from safetensors.torch import load_file

    alone = dmd_here("sample", tmp_path / "run", "--num", 12, "--teacher-steps", 0, "--batch-size", 6,
                     "--out", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    x = load_file(str(tmp_path / "alone" / "samples.safetensors"))["x"]
    kept = [load_file(str(f))["x"] for f in (tmp_path / "cmp").glob("*/samples.safetensors")]
    assert sum(torch.equal(x, k) for k in kept) == 1 and not torch.equal(x, load_file(
        str(tmp_path / "cmp" / "teacher-1" / "samples.safetensors"))["x"])
    fid = dmd_here("fid", tmp_path / "alone", "--ref", ref / "samples.safetensors", "--features", "fashion",
                   "--batch-size", 6, "--json", tmp_path / "alone.json")
    assert fid.returncode == 0, fid.stderr
    measured = json.loads((tmp_path / "alone.json").read_text())
    assert measured["fid"] == pytest.approx(rows[("student", 1)]["fid"], abs=1e-6)
    assert measured["class_accuracy"] == rows[("student", 1)]["class_accuracy"]


def test_compare_shares_the_teachers_rows_between_runs_and_resumes_unchanged_rows(tmp_path):
    """Two runs of one teacher in one call: a row each, then the teacher's rows once. A rerun
    reads back every row whose settings and weights are unchanged; a run retrained to the same
    step under the same path is sampled again, and so is a teacher retrained in place; a run of
    another guidance is refused."""
    import shutil

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    recipe = unet2d_recipe(tmp_path / "r.toml", teacher, tmp_path / "a", steps=2)
    for name, seed in [("a", 0), ("b", 1)]:
        made = dmd_here("distill", recipe, "--set", f"run.out={tmp_path / name}", "--set", f"run.seed={seed}")
        assert made.returncode == 0, made.stderr
    ref = tmp_path / "ref"
    assert dmd_here("sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", 10,
                   "--teacher-steps", 2, "--guidance", 2, "--out", ref).returncode == 0
    cmp = tmp_path / "cmp"
    args = ("--out", cmp, "--ref", ref / "samples.safetensors", "--num", 10, "--teacher-steps", 2,
            "--features", "fashion", "--batch-size", 5)

    def rows():
        result = dmd_here("compare", tmp_path / "a", tmp_path / "b", *args)
        assert result.returncode == 0, result.stderr
        report = json.loads((cmp / "compare.json").read_text())
        return result, {(r["who"], r.get("run", "").split("/")[-1]): r for r in report["rows"]}

    first, rows1 = rows()
    assert list(rows1) == [("student", "a"), ("student", "b"), ("teacher", "")]
    assert not any(r["resumed"] for r in rows1.values())
    assert rows1[("student", "a")]["fid"] != rows1[("student", "b")]["fid"]   # two seeds: two students
    assert abs(rows1[("teacher", "")]["fid"]) < 1e-3
    assert sorted(p.name for p in cmp.iterdir()) == [".lock", "compare.json", "grid.png", "student-a", "student-b",
                                                      "teacher-2"]
    assert "read back" not in first.stderr and "student a (1" in first.stdout
    teacher_file = cmp / "teacher-2" / "samples.safetensors"
    stamp = teacher_file.stat().st_mtime_ns
    again, rows2 = rows()
    assert all(r["resumed"] for r in rows2.values()) and teacher_file.stat().st_mtime_ns == stamp
    assert [{**r, "resumed": False} for r in rows2.values()] == list(rows1.values())
    assert f"read back from {cmp}" in again.stderr
    # A second compare into the folder while one runs is refused, and leaves it as it was.
    import os

    from dmdcli.utils.io import try_lock

    held = try_lock(cmp)
    busy = run_dmd("compare", tmp_path / "a", tmp_path / "b", *args)
    held.close()
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert f"{cmp} is in use by another `dmd compare` (process {os.getpid()}); let it finish, or choose another " \
           "--out" in busy.stderr.replace("\n", "")
    assert teacher_file.stat().st_mtime_ns == stamp
    # b retrained from scratch to the same step under the same path, on another seed: not reused.
    shutil.rmtree(tmp_path / "b")
    assert dmd_here("distill", recipe, "--set", f"run.out={tmp_path / 'b'}", "--set", "run.seed=2").returncode == 0
    _, rows3 = rows()
    assert [r["resumed"] for r in rows3.values()] == [True, False, True]
    assert rows3[("student", "b")]["fid"] != rows1[("student", "b")]["fid"]
    # The teacher retrained in place (other weights, same folder): its row is made again.
    shutil.rmtree(teacher)
    save_tiny_unet2d(teacher, seed=5)
    _, rows4 = rows()
    assert rows4[("teacher", "")]["resumed"] is False and rows4[("teacher", "")]["fid"] > 1e-2
    # A run of another guidance is refused before anything is written.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    saved = tmp_path / "c" / "recipe.toml"
    saved.write_text(saved.read_text().replace("guidance = 2.0", "guidance = 1.5"))
    bad = dmd_here("compare", tmp_path / "a", tmp_path / "c", *args[:1], tmp_path / "cmp-c", *args[2:])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{tmp_path / 'c'} distils another teacher or guidance than {tmp_path / 'a'}" in bad.stderr
    assert "compare runs of one teacher together" in bad.stderr and not (tmp_path / "cmp-c").exists()


def test_compare_refuses_vector_students_before_writing(tmp_path, tiny_recipe):
    from dmdcli.cli import main

    assert main(["distill", str(tiny_recipe(steps=4, checkpoint_every=4))]) == 0
    assert main(["compare", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "c"), "--ref", "gmm"]) == 2
    assert not (tmp_path / "c").exists()


def test_within_class_spread_is_zero_for_a_collapsed_generator_and_the_std_otherwise():
    import torch

    from dmdcli.evaluation.samples import within_class_spread

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4000) % 4
    # Per class one fixed image: a generator that ignores its noise.
    collapsed = (torch.rand(4, 1, 8, 8, generator=g) * 255).round().to(torch.uint8)[labels]
    assert within_class_spread(collapsed, labels) == 0
    # Uniform pixels on [-1, 1] (uint8 0..255): std 2 / sqrt(12) = 0.577 in every class.
    uniform = torch.randint(0, 256, (4000, 1, 8, 8), generator=g, dtype=torch.uint8)
    assert abs(within_class_spread(uniform, labels) - 2 / 12 ** 0.5) < 0.01
    # Spread is measured within each class, not across them: distinct per-class images are still 0.
    assert within_class_spread(collapsed, None) > 0.1


def test_images_per_second_times_the_network_not_start_up_or_input_noise(monkeypatch):
    """On a GPU the first call pays CUDA's lazy start-up, and the per-index noise is CPU
    work: timing either would make a one-step student look several times slower."""
    import time

    import torch

    from dmdcli.evaluation import generate
    from dmdcli.teachers.gmm import GMMTeacher
    from dmdcli.recipe import GMMConfig

    teacher = GMMTeacher(GMMConfig(conditional=True))
    slow_noise = generate.sample_noise

    def noise(*args):
        time.sleep(0.05)
        return slow_noise(*args)

    monkeypatch.setattr(generate, "sample_noise", noise)
    calls = []

    def fn(z, cond, idx):
        time.sleep(0.4 if not calls else 0.01)   # the first call: start-up
        calls.append(len(idx))
        return torch.zeros(len(idx), *teacher.sample_shape)

    x, rate = generate._batched(fn, range(12), 4, teacher, seed=0)
    assert calls == [1, 4, 4, 4] and x.shape[0] == 12   # a one-sample warm-up, then the batches
    assert 100 < rate < 1300   # 12 samples in 3 x 0.01 s; timing start-up and noise too gave 12 / 0.63 = 19


def test_fid_reads_the_npz_that_sample_writes(tmp_path):
    """`dmd sample --images npz` then `dmd fid FILE.npz`: the same report as on the samples
    file, class accuracy and within-class spread included; a bad array is refused in one line."""
    import numpy as np

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    made = dmd_here("sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", 20,
                   "--teacher-steps", 2, "--out", tmp_path / "s", "--images", "npz")
    assert made.returncode == 0, made.stderr
    reports = []
    for samples in (tmp_path / "s", tmp_path / "s" / "samples.npz"):
        out = tmp_path / f"{len(reports)}.json"
        result = dmd_here("fid", samples, "--ref", tmp_path / "s" / "samples.safetensors", "--features", "fashion",
                         "--json", out)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1]
    assert abs(reports[1]["fid"]) < 1e-3 and reports[1]["class_accuracy"] is not None
    assert 0 < reports[1]["within_class_spread"] < 2
    assert "within-class spread" in result.stdout
    ref = tmp_path / "s" / "samples.safetensors"
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8), label=np.zeros(3, dtype=np.int64))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s" / "samples.npz").read_bytes()[:500])
    for name, message in [("bad.npz", "needs arr_0, uint8 images N x H x W x C"),
                          ("labels.npz", "labels must be 4 integers, one per image; got int64 (3,)"),
                          ("cut.npz", "is not a readable .npz")]:
        bad = dmd_here("fid", tmp_path / name, "--ref", ref, "--features", "fashion")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_compare_stopped_while_measuring_measures_the_kept_samples_on_rerun(tmp_path, monkeypatch):
    """A call stopped after a row's samples are written, during its FID, leaves row.json with
    the key and rate only; the rerun measures those samples instead of sampling again, and
    gets the figures an uninterrupted call gets."""
    import pytest

    import dmdcli.evaluation.fid
    import dmdcli.evaluation.generate
    from dmdcli.evaluation.compare import compare

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    recipe = unet2d_recipe(tmp_path / "r.toml", teacher, tmp_path / "run", steps=2)
    assert dmd_here("distill", recipe).returncode == 0
    ref = tmp_path / "ref"
    assert dmd_here("sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", 10,
                   "--teacher-steps", 2, "--guidance", 2, "--out", ref).returncode == 0
    args = (10, [2], str(ref / "samples.safetensors"), "fashion")
    whole = compare(tmp_path / "run", tmp_path / "whole", *args, batch_size=5)

    measure = dmdcli.evaluation.fid.fid_report

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmdcli.evaluation.fid, "fid_report", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare(tmp_path / "run", tmp_path / "cmp", *args, batch_size=5)
    kept = json.loads((tmp_path / "cmp" / "student" / "row.json").read_text())
    assert "row" not in kept and kept["images_per_second"] > 0
    stamp = (tmp_path / "cmp" / "student" / "samples.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(dmdcli.evaluation.fid, "fid_report", measure)
    make = dmdcli.evaluation.generate.make_samples
    sampled = []
    monkeypatch.setattr(dmdcli.evaluation.generate, "make_samples", lambda *a, **k: sampled.append(k["teacher_steps"]) or make(*a, **k))
    again = compare(tmp_path / "run", tmp_path / "cmp", *args, batch_size=5)
    assert sampled == [2]   # the teacher's row only: the student's kept samples were measured, not remade
    assert (tmp_path / "cmp" / "student" / "samples.safetensors").stat().st_mtime_ns == stamp
    assert [r["resumed"] for r in again] == [True, False]
    assert again[0]["images_per_second"] == kept["images_per_second"]
    drop = ("resumed", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole]
    assert "row" in json.loads((tmp_path / "cmp" / "student" / "row.json").read_text())
