"""`distill --dry-run`'s memory figures: the state it predicts is what the trainer holds, its
activation measure on the meta device equals an independent count on real tensors, and the
shipped GPU recipes fit the cards they say they fit."""

import copy
import re

import pytest
import torch

from dmdcli.dryrun import _networks, activation_bytes, state_bytes
from dmdcli.memory import saved_bytes
from dmdcli.recipe import load_recipe
from dmdcli.teachers import build_teacher
from dmdcli.trainer import DMDTrainer
from tiny_models import save_tiny_unet2d, unet2d_recipe


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory):
    return save_tiny_unet2d(tmp_path_factory.mktemp("u") / "t", num_classes=3)


def held_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_predicted_state_is_what_the_trainer_holds_after_a_step(tmp_path, unet_teacher):
    """Weights, gradients (measured just before each optimiser step), AdamW state and the EMA
    of a trained tiny unet2d run equal the dry run's figures to the byte."""
    recipe = load_recipe(unet2d_recipe(tmp_path / "r.toml", unet_teacher, tmp_path / "run",
                                       extra="ema_decay = 0.9\n"))
    predicted = state_bytes(recipe, *_networks(recipe, build_teacher(recipe.teacher)))
    trainer = DMDTrainer(recipe)
    grads = {}
    for name, opt in (("g", trainer.opt_g.optimizer), ("c", trainer.opt_c.optimizer)):
        opt.register_step_pre_hook(lambda o, *_, name=name: grads.__setitem__(
            name, held_bytes(p.grad for group in o.param_groups for p in group["params"] if p.grad is not None)))
    trainer.train_step()   # ratio 1: a generator step and a critic step
    nets = [trainer.acc.unwrap_model(n) for n in (trainer.generator, trainer.critic)]
    optimisers = (trainer.opt_g.optimizer, trainer.opt_c.optimizer)
    assert predicted == {
        "weights": held_bytes(p for n in nets for p in n.parameters()),
        "gradients": grads["g"] + grads["c"],
        "AdamW state": held_bytes(v for o in optimisers for s in o.state.values() for v in s.values()),
        "EMA": held_bytes(trainer.ema.shadow_params)}
    assert predicted["gradients"] > 0 and predicted["EMA"] == predicted["weights"] // 2


def counted_on_real_tensors(net, args, autocast: bool) -> int:
    """Saved-for-backward bytes of a real CPU pass, each storage once, parameters excluded:
    counted independently of dmdcli.memory."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        net(*args)
    return sum(seen.values())


class Plain(torch.nn.Module):
    """A tiny diffusers UNet2DModel without attention (the meta measure replaces attention's
    kernel by what a GPU's fused kernel keeps, which a CPU pass does not)."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                add_attention=False, norm_num_groups=8, layers_per_block=1)

    def forward(self, x, t):
        return self.unet(x, t).sample


@pytest.fixture
def plain():
    return Plain().train()


def plain_args(n, device):
    return torch.randn(n, 1, 16, 16).to(device), torch.rand(n).to(device)


@pytest.mark.parametrize("autocast", [False, True])
def test_meta_measure_equals_a_count_on_real_tensors(plain, autocast):
    """In fp32 to the byte; in bf16, our autocast emulation given CPU autocast's policy (which
    keeps group norms in bf16, where CUDA's keeps them in fp32) to 0.2%: the meta kernels keep
    a group norm's statistics in the input's dtype and its affine parameters as fp32 copies,
    the CPU kernels not (34 and 17 small tensors here, 1.7 KB)."""
    real = counted_on_real_tensors(plain, plain_args(4, "cpu"), autocast)
    meta = copy.deepcopy(plain).to("meta")

    def measure(**policy):
        return saved_bytes(lambda: meta(*plain_args(4, "meta")), [meta], torch.bfloat16 if autocast else None,
                           **policy)

    assert measure(fp32_ops=frozenset()) == (pytest.approx(real, rel=2e-3) if autocast else real)
    if autocast:   # CUDA's policy: the norms' outputs in fp32, the convolutions' inputs cast again
        assert real < measure() < 2 * real


def test_checkpointing_keeps_the_inputs_and_one_segment(plain):
    """With checkpointing, the figure is what stays outside the blocks plus the largest block;
    it is smaller than without, and both grow linearly with the batch."""
    meta = copy.deepcopy(plain).to("meta")

    def measure(n):
        return saved_bytes(lambda: meta(*plain_args(n, "meta")), [meta], None)

    full = [measure(n) for n in (2, 4, 8)]
    meta.unet.enable_gradient_checkpointing()   # diffusers calls torch.utils.checkpoint.checkpoint
    ckpt = [measure(n) for n in (2, 4, 8)]
    for fig in (full, ckpt):
        assert fig[2] - fig[1] == 2 * (fig[1] - fig[0]) > 0
    assert ckpt[2] < 0.7 * full[2]   # two levels, one block each: the largest segment is a large share


def test_gpu_recipes_fit_the_cards_they_name(capsys):
    """The SD1.5 and ImageNet-64 recipes at the authors' batch per GPU, measured from their
    published architectures (their weights are not here): gradient checkpointing on SD1.5 as
    the authors; each fits an 80 GB card with a tenth to spare. SD3.5 Medium and SDXL trained
    whole (sharded over 64 GPUs by FastVideo and the authors) need an H200 on one card, or LoRA."""
    from dmdcli.cli import main

    expected = {"sd15": (32, True, "fits 40 GB and 80 GB cards"),
                "sd15-dmd": (32, True, "fits an 80 GB card, not a 40 GB one"),
                "imagenet64": (40, False, "fits 40 GB and 80 GB cards"),
                "imagenet64-dmd": (40, False, "fits an 80 GB card, not a 40 GB one"),
                "sd3": (1, True, "fits a 141 GB card (H200), not an 80 GB one: for 80 GB cards, train LoRA "
                                 "adapters (train.lora_rank)"),
                "sdxl": (2, True, "fits a 141 GB card (H200), not an 80 GB one: for 80 GB cards, train LoRA "
                                  "adapters (train.lora_rank)")}
    for name, (batch, checkpointing, verdict) in expected.items():
        r = load_recipe(f"recipes/{name}.toml")
        assert (r.train.batch_size, r.train.gradient_checkpointing, r.train.mixed_precision) == \
            (batch, checkpointing, "bf16")
        assert main(["distill", f"recipes/{name}.toml", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "# measured on " in out and "architecture" in out
        peak = next(line for line in out.splitlines() if line.startswith("# peak per process"))
        assert peak.endswith(verdict), (name, peak)
        # Sharded (FSDP2): the trained state splits, the rest stays whole on every process.
        sharded = next(line for line in out.splitlines() if line.startswith("# sharded with train.sharding"))
        whole = float(re.search(r"about ([\d.]+) GiB", peak)[1])
        p2, p4, p8 = (float(re.search(rf"([\d.]+) GiB over {n}\b", sharded)[1]) for n in (2, 4, 8))
        assert p2 > p4 > p8, (name, sharded)
        if name in ("sd15", "sd15-dmd", "sd3", "sdxl"):   # their state, not activations, fills the card
            assert whole > p2, (name, sharded)
        assert p2 - p4 == pytest.approx(2 * (p4 - p8), rel=0.02), (name, sharded)


def test_activation_turns_follow_the_recipe(tmp_path, unet_teacher):
    """Twice the batch, about twice the activations in both turns."""
    recipe = load_recipe(unet2d_recipe(tmp_path / "r.toml", unet_teacher, tmp_path / "run"))
    teacher = build_teacher(recipe.teacher)
    base = activation_bytes(recipe, teacher, *_networks(recipe, teacher))
    recipe.train.batch_size *= 2
    double = activation_bytes(recipe, teacher, *_networks(recipe, teacher))
    for turn in base:
        assert double[turn] > 1.8 * base[turn] > 0
