"""train-teacher on a real Fashion-MNIST slice: a few steps, resume, and a diffusers folder
that UNet2DModel.from_pretrained and the unet2d teacher load."""

import pytest
import torch
from diffusers import UNet2DModel

from dmdcli.cli import main
from dmdcli.datasets import DEBIAN_FASHION_MNIST, load_images

needs_data = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                reason="Debian package dataset-fashion-mnist is not installed "
                                       "(make test installs it where apt-get is allowed)")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))


@needs_data
def test_fashion_mnist_loads_padded_to_32():
    x, y, classes = load_images("fashion-mnist", "test", 32, limit=100)
    assert x.shape == (100, 1, 32, 32) and classes == 10
    assert x.min() == -1.0 and x.max() <= 1.0 and (x[:, :, :2] == -1).all()   # padded border
    assert y.tolist()[:5] == [9, 2, 1, 1, 6]    # the first test labels of Fashion-MNIST


@needs_data
def test_train_teacher_few_steps_resume_and_load(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-teacher", "recipes/fashion-teacher.toml", "--set", f"run.out={out}", "--set", "data.limit=512",
            "--set", "train.batch_size=16", "--set", "run.checkpoint_every=2", "--set", "model.block_out_channels=[16, 32]"]
    assert main(args + ["--set", "train.steps=2"]) == 0
    assert main(args + ["--set", "train.steps=4"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    unet = UNet2DModel.from_pretrained(out / "teacher" / "unet")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 32
    with torch.no_grad():
        y = unet(torch.zeros(2, 1, 32, 32), torch.tensor([10, 500]), class_labels=torch.tensor([3, 10])).sample
    assert y.shape == (2, 1, 32, 32)
    # The exported folder is a unet2d teacher.
    assert main(["make-pairs", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={out / 'teacher'}",
                 "--num", "2", "--out", str(tmp_path / "pairs"), "--steps", "2"]) == 0


def test_missing_image_folder_is_one_line(tmp_path, capsys):
    code = main(["train-teacher", "recipes/fashion-teacher.toml", "--set", f"run.out={tmp_path / 'r'}",
                 "--set", f'data.dataset="imagefolder:{tmp_path}/none"'])
    assert code == 2
    assert f"image folder not found: {tmp_path}/none" in capsys.readouterr().err


@needs_data
def test_train_edm_teacher_resumes_and_is_a_guided_edm_teacher(tmp_path, capsys):
    """family = "edm": EDM's ADM behind EDM's preconditioning; the EMA network is a dmd-edm/1
    folder that the edm teacher loads, guidable (label dropout to the zero label vector)."""
    import json

    from dmdcli.teachers.edm import EDMTeacher
    from dmdcli.recipe import EDMConfig

    out = tmp_path / "run"
    args = ["train-teacher", "recipes/fashion-edm-teacher.toml", "--set", f"run.out={out}", "--set", "data.limit=256",
            "--set", "train.batch_size=8", "--set", "run.checkpoint_every=2", "--set", "model.block_out_channels=[16, 64]"]
    assert main(args + ["--set", "train.steps=2"]) == 0
    assert main(args + ["--set", "train.steps=4"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and 'teacher.name = "edm"' in captured.err
    config = json.loads((out / "teacher" / "config.json").read_text())
    assert config["format"] == "dmd-edm/1" and config["unconditional"] is True
    assert config["model"]["channel_mult"] == [1, 4] and config["model"]["attn_resolutions"] == [16]
    teacher = EDMTeacher(EDMConfig(model=str(out / "teacher"), dtype="float32"))
    x, sigma, y = torch.randn(3, 1, 32, 32), torch.tensor([0.5, 2.0, 10.0]), torch.tensor([0, 3, 9])
    cond, uncond = teacher.denoise_sigma(x, sigma, y), teacher.denoise_sigma(x, sigma, None)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(teacher.denoise_sigma(x, sigma, y, guidance=2.0), uncond + 2 * (cond - uncond))
    assert main(["make-pairs", "--teacher", "edm", "--set", f"teacher.edm.model={out / 'teacher'}", "--num", "2",
                 "--out", str(tmp_path / "pairs"), "--steps", "2", "--guidance", "2"]) == 0


def test_edm_loss_is_one_at_initialisation_for_data_of_std_sigma_data():
    """EDM's weighting makes the loss of the zero-output network (ADM's last layer starts at
    zero) exactly a unit-variance target's: lambda(sigma) * Var(D - x) = 1 at every sigma for
    data of std sigma_data (EDM section 5). A wrong weighting or preconditioning misses 1."""
    from dmdcli.recipe import TeacherRecipe
    from dmdcli.teacher_training import EDMTeacherTraining

    r = TeacherRecipe()
    r.model.family, r.model.block_out_channels, r.data.image_size = "edm", [64], 8
    family = EDMTeacherTraining(r, channels=1, classes=10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 1, 8, 8, generator=g) * 0.5
    with torch.no_grad():
        loss = family.loss(family.net, x0, torch.randint(0, 11, (512,), generator=g), g, "cpu")
    assert abs(float(loss) - 1.0) < 0.05


def test_edm_channels_must_be_multiples_of_the_first(tmp_path, capsys):
    code = main(["train-teacher", "recipes/fashion-edm-teacher.toml", "--set", f"run.out={tmp_path / 'r'}",
                 "--set", "model.block_out_channels=[32, 48, 64]"])
    assert code == 2
    assert ("model.block_out_channels = [32, 48, 64]: for family 'edm' every entry must be a multiple of the first"
            in capsys.readouterr().err)
