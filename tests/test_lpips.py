"""LPIPS for DMD v1's regression (SPEC section 4): converted once from its two pickles (only
with --trust-pickle) to safetensors, then the real `lpips` network in training. The trunk here
has random weights (torchvision's ImageNet files are a download); the linear layers are the
real ones the lpips package ships."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

lpips = pytest.importorskip("lpips")

from dmdcli.cli import main  # noqa: E402
from dmdcli.perceptual import load_lpips, lpips_distance  # noqa: E402
from tiny_models import save_tiny_unet2d, unet2d_recipe  # noqa: E402


def write_trunk(path: Path, net: str, seed: int = 0) -> torch.nn.Sequential:
    """torchvision's own network with random weights, its `features.*` tensors saved as
    torchvision's files hold them (the classifier is left out: LPIPS does not use it)."""
    import torchvision

    torch.manual_seed(seed)
    model = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet}[net](weights=None)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)
    return model.features.eval()


def test_conversion_needs_the_flag_and_gives_the_same_network(tmp_path, capsys):
    features = write_trunk(tmp_path / "vgg16.pth", "vgg")
    out = tmp_path / "lpips-vgg.safetensors"
    assert main(["convert-lpips", str(tmp_path / "vgg16.pth"), "--out", str(out)]) == 2
    assert (f"reading {tmp_path / 'vgg16.pth'} means unpickling it (a torch .pth); if you trust the file, add "
            f"--trust-pickle") in capsys.readouterr().err.replace("\n", "")
    assert not out.exists()
    assert main(["convert-lpips", str(tmp_path / "vgg16.pth"), "--out", str(out), "--trust-pickle"]) == 0
    model = load_lpips(out)
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # The trunk is torchvision's VGG16: LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
        h, taps = model.scaling_layer(x), []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                taps.append(h)
        for ours, theirs in zip(model.net(model.scaling_layer(x)), taps, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        # The linear layers are the ones the lpips package ships.
        linear = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                            weights_only=True)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in linear.items())
        up = torch.nn.functional.interpolate
        expected = model(up(x, size=224, mode="bilinear"), up(y, size=224, mode="bilinear")).mean()
        assert torch.equal(lpips_distance(model, x, y), expected)
        assert lpips_distance(model, x, x).item() == 0 and expected.item() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_wrong_files_are_named(tmp_path, capsys):
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    assert main(["convert-lpips", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o.safetensors"),
                 "--trust-pickle"]) == 2
    assert f"{tmp_path / 'bad.pth'} has no 'features.0.weight': give torchvision's vgg ImageNet weights" in \
        capsys.readouterr().err.replace("\n", "")
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="is not a safetensors file; make it with `dmd convert-lpips`"):
        load_lpips(tmp_path / "x.safetensors")


def test_dmd_v1_trains_with_lpips_on_decoded_images(tmp_path):
    """Two iterations of DMD v1 with distance "lpips" (AlexNet trunk, for speed): the
    regression term is positive and finite and moves the generator."""
    write_trunk(tmp_path / "alex.pth", "alex")
    weights = tmp_path / "lpips-alex.safetensors"
    assert main(["convert-lpips", str(tmp_path / "alex.pth"), "--net", "alex", "--out", str(weights),
                 "--trust-pickle"]) == 0
    teacher = save_tiny_unet2d(tmp_path / "teacher")
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", "4",
                 "--steps", "2", "--guidance", "2", "--out", str(pairs)]) == 0
    recipe = unet2d_recipe(tmp_path / "r.toml", teacher, tmp_path / "run", steps=2, extra=(
        f'method = "dmd"\n[regression]\npairs = "{pairs}"\ndistance = "lpips"\nlpips_weights = "{weights}"\n'))
    from dmdcli.recipe import load_recipe
    from dmdcli.trainer import DMDTrainer

    trainer = DMDTrainer(load_recipe(recipe, ["run.out=" + str(tmp_path / "probe")]))
    x, y = (torch.rand(2, 1, 16, 16, device=trainer.acc.device) * 2 - 1 for _ in range(2))
    assert isinstance(trainer.lpips, lpips.LPIPS)
    assert torch.equal(trainer._regression(x, y), lpips_distance(trainer.lpips, x, y))
    assert trainer._regression(x, x).item() == 0
    # In chunks under activation checkpointing (3 samples, chunks of 2): the same loss and gradient.
    x3, y3 = (torch.rand(3, 1, 16, 16, device=trainer.acc.device) * 2 - 1 for _ in range(2))
    a, b = x3.clone().requires_grad_(True), x3.clone().requires_grad_(True)
    chunked, whole = trainer._regression(a, y3, chunk=2), lpips_distance(trainer.lpips, b, y3)
    (chunked.backward(), whole.backward())
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(a.grad, b.grad)
    assert main(["distill", str(recipe), "--set", "run.log_every=1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reg = [r["loss_reg"] for r in rows if "loss_reg" in r]
    assert reg and all(0 < v < float("inf") for v in reg)
    # The generator started as the teacher's UNet and has moved.
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "generator.safetensors"))
    start = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(trained) == {"unet." + k for k in start}
    assert any(not torch.equal(trained["unet." + k], v) for k, v in start.items())


def test_sd_images_with_grad_carry_gradients_to_latents(tmp_path):
    from dmdcli.recipe import recipe_from_data
    from dmdcli.teachers import build_teacher
    from tiny_models import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "sd")
    teacher = build_teacher(recipe_from_data({"teacher": {"name": "sd", "sd": {"model": str(folder)}}}).teacher)
    z = torch.randn(1, *teacher.sample_shape, requires_grad=True)
    images = teacher.images_with_grad(z)
    assert images.shape[1] == 3 and images.shape[-1] > z.shape[-1]
    images.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(images.clamp(-1, 1), teacher.to_images(z))
