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
