"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

import tomllib

import pytest
import tomli_w

from dmdcli.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("key, value, message", [
    ("train.lerning_rate", 1, "unknown recipe key 'train.lerning_rate' (known keys in [train]: method, steps,"),
    ("train.steps", "100", "recipe key 'train.steps' must be an integer, got '100'"),
    ("train.batch_size", 1.5, "recipe key 'train.batch_size' must be an integer, got 1.5"),
    ("train.method", "dmd3", "recipe key 'train.method' must be one of 'dmd2', 'dmd', got 'dmd3'"),
    ("teacher.gmm.std", "wide", "recipe key 'teacher.gmm.std' must be a number, got 'wide'"),
    ("teacher.gmm.conditional", 1, "recipe key 'teacher.gmm.conditional' must be true or false, got 1"),
    ("train.betas", 0.9, "recipe key 'train.betas' must be a list, got 0.9"),
    ("bogus.x", 1, "unknown recipe key 'bogus' (known keys in the top level: run, teacher,"),
    ("train", 3, "recipe key 'train' must be a table (section)"),
    ("train.steps", 0, "recipe key 'train.steps' must be positive, got 0"),
    ("student.timesteps", [499, 999], "recipe key 'student.timesteps' must be a non-empty, strictly descending"),
    ("student.timesteps", [1000], "of timesteps in 0..999, e.g. [999] or [999, 749, 499, 249]; got [1000]"),
    ("student.timesteps", [999, 999], "got [999, 999]"),
    ("teacher.guidance_interval", [600, 300], "recipe key 'teacher.guidance_interval' must be two timesteps "
     "[first, last] with 0 <= first <= last <= 999, e.g. [0, 999] (guide everywhere); got [600, 300]"),
    ("teacher.guidance_interval", [300], "got [300]"),
    ("teacher.guidance_interval", [0, 1000], "got [0, 1000]"),
    ("train.critic_ema_decay", 1.0, "recipe key 'train.critic_ema_decay' must be below 1 (0: off), got 1.0"),
    ("train.dm_timesteps", [980, 20], "recipe key 'train.dm_timesteps' must be two timesteps [first, last] with "
     "0 <= first <= last <= 999, e.g. [20, 980] (the papers'); got [980, 20]"),
    ("regression.distance", "lpips",
     "regression.distance = 'lpips' needs regression.lpips_weights = FILE, made by `dmd convert-lpips`"),
    ("train.lr_decay_steps", 32, "recipe key 'train.lr_decay_steps' (32) plus train.warmup_steps (5) must fit "
     "in the generator's 36 iterations (train.steps minus train.critic_warmup_steps)"),
    ("train.lr_critic", -1e-3, "recipe key 'train.lr_critic' must be positive, got -0.001"),
    ("teacher.gmm.layers", 0, "recipe key 'teacher.gmm.layers' must be positive, got 0"),
    ("run.preview_samples", -5, "recipe key 'run.preview_samples' must not be negative, got -5"),
    ("teacher.gmm.components", 0, "teacher.gmm.components must be at least 1, got 0"),
    ("teacher.gmm.means", [[0.0, 1.0], [2.0]], "teacher.gmm.means must be a list of equal-length lists"),
    ("teacher.gmm.weights", [1.0, 2.0], "teacher.gmm: means, stds and weights must have the same length (8"),
    ("teacher.name", "sdxxl", "unknown teacher 'sdxxl': available teachers are 'gmm', 'sd', 'unet2d'"),
])
def test_bad_recipe_key(capsys, tiny_recipe, key, value, message):
    path = tiny_recipe()
    data = tomllib.loads(path.read_text())
    *sections, last = key.split(".")
    node = data
    for name in sections:
        node = node.setdefault(name, {})
    node[last] = value
    path.write_text(tomli_w.dumps(data))
    code, _, err = run(capsys, "distill", path)
    assert code == 2
    assert message in one_error_line(err)


@pytest.mark.parametrize("schedule, prediction, message", [
    ("flow", "epsilon", "student.prediction_type = 'epsilon': a flow teacher's student predicts the velocity "
                        "('teacher' or 'flow') or x0 ('sample')"),
    ("flow", "v_prediction", "student.prediction_type = 'v_prediction': a flow teacher's student"),
    ("vp", "flow", "student.prediction_type = 'flow' needs a flow-matching teacher; the gmm teacher's noise is vp"),
])
def test_student_prediction_type_must_suit_the_noise(capsys, tiny_recipe, schedule, prediction, message):
    path = tiny_recipe(extra=f'\n[student]\nprediction_type = "{prediction}"\n')
    path.write_text(path.read_text().replace("[teacher.gmm]\n", f'[teacher.gmm]\nschedule = "{schedule}"\n'))
    code, _, err = run(capsys, "distill", path)
    assert code == 2
    assert message in one_error_line(err)


def test_missing_pairs_folder(tmp_path, capsys, tiny_recipe):
    path = tiny_recipe(method="dmd", extra=f'\n[regression]\npairs = "{tmp_path}/nope"\n')
    code, _, err = run(capsys, "distill", path)
    assert code == 2
    assert one_error_line(err).endswith(
        f"pairs folder not found or not made by `dmd make-pairs`: {tmp_path}/nope (no manifest.json); "
        f"run `dmd make-pairs ... --out {tmp_path}/nope` first")


def test_dmd_without_pairs(capsys, tiny_recipe):
    code, _, err = run(capsys, "distill", tiny_recipe(method="dmd"))
    assert code == 2
    assert "train.method = 'dmd' needs regression pairs: set regression.pairs" in one_error_line(err)


@pytest.mark.parametrize("args, message", [
    (["distill", "no/such/recipe.toml"], "recipe file not found: no/such/recipe.toml"),
    (["distill", "{recipe}", "--set", "train.steps"], "expected section.key=value"),
    (["distill", "{recipe}", "--set", "train.stepz=3"], "unknown recipe key 'train.stepz'"),
    (["distill", "{recipe}", "--set", "train.steps=many"], "'train.steps' must be an integer, got 'many'"),
    (["sample", "{tmp}/none", "--out", "{tmp}/s"], "no run or checkpoint at"),
    (["sample", "{tmp}", "--out", "{tmp}/s"], "is not a run folder (no recipe.toml)"),
    (["sample", "{tmp}", "--out", "{tmp}/s", "--batch-size", "0"], "--num and --batch-size must be positive"),
    (["fid", "{tmp}/none.safetensors"], "samples not found:"),
    (["fid", "{recipe}"], "is not a readable safetensors samples file"),
    (["make-pairs", "--teacher", "sdxxl", "--num", "4", "--out", "{tmp}/p"], "unknown teacher 'sdxxl'"),
    (["make-pairs", "--teacher", "gmm", "--num", "0", "--out", "{tmp}/p"], "must be positive"),
    (["make-pairs", "--teacher", "gmm", "--num", "4", "--out", "{tmp}/p", "--sampler", "heun3"],
     "unknown sampler 'heun3'"),
    (["make-pairs", "--teacher", "edm", "--num", "4", "--out", "{tmp}/p"], "teacher.edm.model is empty"),
    (["sample", "--teacher", "edm", "--set", "teacher.edm.model={tmp}", "--num", "4", "--out", "{tmp}/s"],
     "is not an EDM teacher folder (config.json and model.safetensors); make one with `dmd convert-teacher"),
    (["compare", "{tmp}/none", "--out", "{tmp}/c", "--ref", "gmm"], "no run or checkpoint at"),
    (["compare", "{tmp}", "--out", "{tmp}/c", "--ref", "gmm", "--teacher-steps", "a,b"],
     "--teacher-steps must be comma-separated integers, got 'a,b'"),
    (["convert-teacher", "{tmp}/none.pkl", "--out", "{tmp}/t"], "no such file:"),
    (["convert-teacher", "{recipe}", "--out", "{tmp}/t"], "is not a readable pickle"),
    (["convert-teacher", "{evil}", "--out", "{tmp}/t"],
     "asks to import posix.system, which is not a tensor or a plain container; refused because loading it "
     "could run code; pass --trust-pickle only if you trust where the file came from"),
])
def test_bad_command_line(tmp_path, capsys, tiny_recipe, args, message):
    import os
    import pickle

    recipe = tiny_recipe()
    evil = tmp_path / "evil.pkl"   # unpickling it would run a shell command
    evil.write_bytes(pickle.dumps(type("Evil", (), {"__reduce__": lambda self: (os.system, ("true",))})()))
    args = [a.format(recipe=recipe, tmp=tmp_path, evil=evil) for a in args]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in one_error_line(err)


def test_invalid_toml(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[train\nsteps = 3\n")
    code, _, err = run(capsys, "distill", path)
    assert code == 2
    assert one_error_line(err).startswith(f"dmd: error: recipe {path} is not valid TOML")


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run(capsys, "distill", "x.toml", "--no-such-flag")
    assert code == 2
    assert "No such option: --no-such-flag" in err


def test_pairs_from_another_teacher_are_refused(tmp_path, capsys, tiny_recipe):
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "8", "--out", str(out), "--steps", "2"]) == 0
    path = tiny_recipe(method="dmd", extra=f'\n[regression]\npairs = "{out}"\n')
    path.write_text(path.read_text().replace("[teacher.gmm]\n", "[teacher.gmm]\nradius = 5.0\n"))
    capsys.readouterr()
    code, _, err = run(capsys, "distill", path)
    assert code == 2
    assert f"pairs in {out} were made by another teacher than the recipe's (gmm; gmm.radius differ)" in one_error_line(err)
