"""The Fashion-MNIST teacher shipped in the package: small, loadable by name, and it draws a
grid of garments, one class a column (the grid in docs/ was made the same way, 10 rows at 32 steps)."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dmdcli
from dmdcli.cli import main
from dmdcli.utils.errors import UserError

ASSET = Path(dmdcli.__file__).resolve().parent / "assets" / "fashion-teacher"


def test_shipped_teacher_is_small_safetensors():
    weights = ASSET / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 15 * 2**20
    assert sum(v.numel() for v in load_file(str(weights)).values()) > 10**6
    assert "dmd train-teacher recipes/fashion-teacher.toml" in (ASSET / "README.md").read_text()


def test_shipped_teacher_draws_a_class_grid(tmp_path):
    out = tmp_path / "grid"
    assert main(["sample", "--teacher", "unet2d", "--set", "teacher.unet2d.model='fashion-mnist'", "--num", "30",
                 "--teacher-steps", "16", "--out", str(out), "--batch-size", "30"]) == 0
    assert Image.open(out / "samples.png").size == (10 * 34 + 2, 3 * 34 + 2)   # 10 classes x 3 rows
    samples = load_file(str(out / "samples.safetensors"))
    assert samples["x"].shape == (30, 1, 32, 32) and samples["label"].tolist()[:12] == list(range(10)) + [0, 1]
    x = samples["x"]
    # Garments on a black background: the padded border is background, the centre is not.
    assert x[:, :, :2].mean() < -0.9 and x[:, :, 8:24, 8:24].mean() > x[:, :, :2].mean() + 0.3
    assert torch.isfinite(x).all()


EDM_ASSET = Path(dmdcli.__file__).resolve().parent / "assets" / "fashion-edm-teacher"


def test_shipped_edm_teacher_is_small_guidable_safetensors():
    import json

    weights = EDM_ASSET / "model.safetensors"
    assert weights.stat().st_size < 15 * 2**20
    assert sum(v.numel() for v in load_file(str(weights)).values()) > 10**6
    config = json.loads((EDM_ASSET / "config.json").read_text())
    assert config["format"] == "dmd-edm/1" and config["unconditional"] and config["label_dim"] == 10
    assert "dmd train-teacher recipes/fashion-edm-teacher.toml" in (EDM_ASSET / "README.md").read_text()


def test_shipped_edm_teacher_draws_a_class_grid_by_name(tmp_path):
    """teacher.edm.model = "fashion-mnist" is the shipped EDM teacher; a few Heun steps
    already draw garments on a black background, one class a column."""
    out = tmp_path / "grid"
    assert main(["sample", "--teacher", "edm", "--set", "teacher.edm.model='fashion-mnist'", "--num", "100",
                 "--teacher-steps", "6", "--out", str(out), "--batch-size", "100"]) == 0
    assert Image.open(out / "samples.png").size == (10 * 34 + 2, 10 * 34 + 2)
    x = load_file(str(out / "samples.safetensors"))["x"]
    assert x.shape == (100, 1, 32, 32) and torch.isfinite(x).all()
    assert x[:, :, :2].mean() < -0.9 and x[:, :, 8:24, 8:24].mean() > x[:, :, :2].mean() + 0.3


STUDENT_ASSET = Path(dmdcli.__file__).resolve().parent / "assets" / "fashion-dmd2-student"


def test_shipped_student_is_small_and_draws_its_classes_in_one_step(tmp_path):
    """fashion-mnist-dmd2 (the benchmark's DMD2 run, float16): under 5 MB, read by name, one
    network call an image; the shipped classifier finds the asked class in most of 50 samples,
    where the teacher's own one step finds it in about half (BENCHMARKS.md)."""
    from dmdcli.evaluation.fid import feature_model

    assert (STUDENT_ASSET / "model.safetensors").stat().st_size < 5 * 2**20
    assert all(v.dtype == torch.float16 for v in load_file(str(STUDENT_ASSET / "model.safetensors")).values())
    assert main(["sample", "fashion-mnist-dmd2", "--num", "50", "--teacher-steps", "0", "--out",
                 str(tmp_path / "s"), "--batch-size", "50"]) == 0
    samples = load_file(str(tmp_path / "s" / "samples.safetensors"))
    classifier = feature_model("fashion", "clean", torch.device("cpu"))
    with torch.no_grad():
        pred = classifier.classify((samples["x"].clamp(-1, 1) + 1) * 127.5).argmax(1)
    assert (pred == samples["label"]).float().mean() >= 0.7


def test_shipped_student_is_the_recipe_as_shipped():
    """fashion-mnist-dmd2 is `dmd distill recipes/fashion.toml` as the recipe stands (BENCHMARKS.md's
    figures are its): the recipe saved in the student differs from the shipped one only in keys that
    leave the result alone (the same check a resumed run passes), and the weights are the run's
    last checkpoint, at the recipe's train.steps."""
    import json

    from dmdcli.recipe import load_recipe
    from dmdcli.runner import check_same_run

    recipe = load_recipe(Path(dmdcli.__file__).resolve().parents[1] / "recipes" / "fashion.toml",
                         ["run.out='runs/fashion'"])
    check_same_run(STUDENT_ASSET, recipe)
    config = json.loads((STUDENT_ASSET / "config.json").read_text())
    assert config["student"]["checkpoint_step"] == recipe.train.steps
    assert "steps = %d\n" % recipe.train.steps in (STUDENT_ASSET / "recipe.toml").read_text()


def test_a_run_starts_from_the_shipped_student(tmp_path):
    """train.init_from = "fashion-mnist-dmd2": the generator (and its EMA) starts at the shipped
    float16 weights, the critic at the teacher's, as in a fresh run (an export has no critic)."""
    from dmdcli.recipe import load_recipe
    from dmdcli.runs import init_from
    from dmdcli.trainer import DMDTrainer

    recipe = load_recipe(Path(dmdcli.__file__).resolve().parents[1] / "recipes" / "fashion.toml",
                         [f"run.out='{tmp_path / 'run'}'", "gan.generator_weight=0", "gan.critic_weight=0",
                          "train.ema_decay=0.99"])
    tr = DMDTrainer(recipe)
    critic_before = {k: v.clone() for k, v in tr.acc.unwrap_model(tr.critic).state_dict().items()}
    said = init_from(tr, Path("fashion-mnist-dmd2"))
    assert said.startswith(f"initialised from {STUDENT_ASSET}: generator from model.safetensors, critic 0 of")
    gen = tr.acc.unwrap_model(tr.generator)
    shipped = load_file(str(STUDENT_ASSET / "model.safetensors"))
    own = gen.model.state_dict()
    assert all(torch.equal(own[k], v.float()) for k, v in shipped.items()) and len(own) == len(shipped)
    assert all(torch.equal(s, p) for s, p in zip(tr.ema.shadow_params, gen.parameters()))
    critic = tr.acc.unwrap_model(tr.critic).state_dict()
    assert all(torch.equal(critic[k], v) for k, v in critic_before.items())
    # An export that lacks one of the generator's tensors is refused, not half-read.
    partial = tmp_path / "partial"
    shutil.copytree(STUDENT_ASSET, partial)
    save_file({k: v for k, v in shipped.items() if k != sorted(shipped)[0]}, str(partial / "model.safetensors"))
    with pytest.raises(UserError, match=f"train.init_from: {partial / 'model.safetensors'} does not fit this "
                                        f"recipe's generator \\(Missing key"):
        init_from(tr, partial)
