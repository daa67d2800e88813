"""sample and fid end to end on a tiny run: the files they write and what fid reports."""

import json

import torch
from safetensors.torch import load_file, safe_open

from conftest import run_dmd
from dmdcli.cli import main


def test_sample_then_fid(tmp_path, tiny_recipe, capsys):
    recipe = tiny_recipe(steps=20, checkpoint_every=10)
    assert main(["distill", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--num", "500", "--out", str(out), "--teacher-steps", "20"]) == 0
    err = capsys.readouterr().err
    assert "student: 500 samples, 1 step(s)" in err and "teacher: 500 samples, 20 step(s)" in err
    # No live bar under pytest (not a terminal): one plain line a sampler when it ends (batches of
    # 256 take well under PLAIN_EVERY seconds, so none at 256).
    plain = [ln.split("/s")[0] for ln in err.splitlines() if "/500  " in ln]
    assert [ln.rsplit("  ", 1)[0] for ln in plain] == ["student, 1 step(s) 500/500", "teacher, 20 step(s) 500/500"]
    student, teacher = load_file(str(out / "samples.safetensors")), load_file(str(out / "teacher.safetensors"))
    assert student["x"].shape == teacher["x"].shape == (500, 2)
    with safe_open(str(out / "samples.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["teacher"])["name"] == "gmm" and "step 20" in meta["source"]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same seed gives the same samples; a checkpoint folder works as well as a run folder.
    out2 = tmp_path / "samples2"
    ckpt = run_dir / "checkpoints" / "step-00000020"
    assert main(["sample", str(ckpt), "--num", "500", "--out", str(out2), "--teacher-steps", "0"]) == 0
    assert torch.equal(load_file(str(out2 / "samples.safetensors"))["x"], student["x"])
    assert not (out2 / "teacher.safetensors").exists()

    capsys.readouterr()
    assert main(["fid", str(out / "teacher.safetensors"), "--json", str(tmp_path / "t.json")]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["metric"] == "Frechet distance in GMM coordinates (not Inception FID)"
    assert report["num_samples"] == 500 and report["precision"] > 0.9 and report["frechet_distance"] < 0.2
    # The untrained 20-step student is far worse than the teacher's 20-step ODE.
    assert main(["fid", str(out), "--ref", str(out / "teacher.safetensors"), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["frechet_distance"] > 1.0
    assert "Frechet distance (GMM coords)" in capsys.readouterr().out
    # --from: the same samples made in memory give the same report, and no file is written.
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["fid", str(out), "--json", str(tmp_path / "file.json")]) == 0
    assert main(["fid", "--from", str(run_dir), "--num", "500", "--json", str(tmp_path / "fly.json")]) == 0
    assert sorted(p for p in tmp_path.rglob("*")) == sorted([*before, tmp_path / "file.json", tmp_path / "fly.json"])
    assert json.loads((tmp_path / "fly.json").read_text()) == json.loads((tmp_path / "file.json").read_text())


def test_a_mixed_precision_run_is_sampled_under_its_precision(tmp_path, tiny_recipe):
    """A student trained under bf16 autocast is sampled under it too (not in float32): `dmd
    sample` equals the in-memory bf16 samples, which differ from float32's by rounding only."""
    from dmdcli.evaluation.generate import generator_tensors
    from dmdcli.runs import load_student

    # In a process of its own: accelerate's state, once made in this one, keeps its precision.
    done = run_dmd("distill", tiny_recipe(steps=4, checkpoint_every=4), "--set", "train.mixed_precision=bf16")
    assert done.returncode == 0, done.stderr
    run_dir, out = tmp_path / "runs" / "tiny", tmp_path / "samples"
    assert main(["sample", str(run_dir), "--num", "64", "--out", str(out), "--teacher-steps", "0"]) == 0
    x = load_file(str(out / "samples.safetensors"))["x"]
    recipe, teacher, generator, _ = load_student(run_dir)
    bf16, fp32 = (generator_tensors(generator, teacher, recipe.student.timesteps, 64, precision=p)["x"]
                  for p in ("bf16", "no"))
    assert torch.equal(x, bf16) and not torch.equal(x, fp32)
    assert (x - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_a_second_sample_or_compare_into_a_busy_folder_is_refused_and_deletes_nothing(tmp_path, tiny_recipe,
                                                                                        capsys):
    """One call per output folder: a second one (another terminal) would delete the first's
    kept batches under .partial/ as stale, and the two would overwrite each other's files."""
    import os

    from dmdcli.utils.io import try_lock

    assert main(["distill", str(tiny_recipe(steps=2))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    out = tmp_path / "samples"
    kept = out / ".partial" / "teacher-0123456789abcdef" / "batch.safetensors"   # the first call's batch
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"kept")
    held = try_lock(out, "`dmd compare`")   # as a running `dmd compare` into this folder holds it
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--num", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"{out} is in use by another `dmd compare` (process {os.getpid()}); let it finish, " \
           "or choose another --out" in err and "Traceback" not in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        [".lock", ".partial", ".partial/teacher-0123456789abcdef", ".partial/teacher-0123456789abcdef/batch.safetensors"]
    held.close()   # the first call ends: the same command now runs, and its own settings replace the stale batch
    assert main(["sample", str(run_dir), "--num", "10", "--out", str(out)]) == 0
    assert (out / "samples.safetensors").is_file() and not (out / ".partial").exists()
    # --out names a file: refused in one line, the file untouched.
    (tmp_path / "file").write_text("mine")
    assert main(["sample", str(run_dir), "--num", "10", "--out", str(tmp_path / "file")]) == 2
    assert f"{tmp_path / 'file'} is a file or under one, not a folder; choose another --out" in \
        capsys.readouterr().err.replace("\n", "")
    assert (tmp_path / "file").read_text() == "mine"


def test_sample_warns_and_goes_on_where_the_filesystem_has_no_locks(tmp_path, tiny_recipe, monkeypatch):
    """Lustre without -o flock, some NFS mounts: flock fails with ENOLCK; sampling must not."""
    import errno
    import fcntl

    import pytest

    assert main(["distill", str(tiny_recipe(steps=2))]) == 0

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="filesystem has no file locks"):
        assert main(["sample", str(tmp_path / "runs" / "tiny"), "--num", "10", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.safetensors").is_file()


def test_python_dash_m_and_console_script_agree():
    result = run_dmd("--help")
    assert result.returncode == 0
    for command in ("distill", "make-pairs", "sample", "fid"):
        assert command in result.stdout
