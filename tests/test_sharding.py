"""train.sharding = "fsdp2": the generator and critic sharded with FSDP2 over two processes
(gloo on CPU, launched by `accelerate launch --multi_gpu` as every multi-process run). A tiny
class-conditional UNet2DModel teacher, DMD2 with the GAN head on real images and an EMA of the
generator, so every sharded path runs: block units, the GAN's logits pass, gathered checkpoints."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, free_port, launch_command, launch_env, run_dmd
from test_multiprocess import launch
from tiny_models import save_tiny_unet2d, unet2d_recipe

STEPS = 8
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")


def test_blocks_are_each_unets_blocks_and_the_mlp_is_one_unit():
    from diffusers import UNet2DModel

    from dmdcli.networks import MLPDenoiser, UNetDenoiser
    from dmdcli.sharding import blocks

    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    units = blocks(UNetDenoiser(unet, "epsilon"))
    assert [id(m) for m in units] == [id(m) for m in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]]
    assert blocks(MLPDenoiser(dim=2)) == []


def sharded_recipe(tmp_path, name: str, sharded: bool):
    """DMD2 + GAN (class folders of 16 px images) + generator EMA on the tiny unet2d teacher; the
    one-process twin has twice the batch (the global batch of the two sharded processes)."""
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        save_tiny_unet2d(teacher)
        g = torch.Generator().manual_seed(0)
        for c in range(3):
            (tmp_path / "images" / str(c)).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (16, 16), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(tmp_path / "images" / str(c) / f"{i}.png")
    extra = ('lr_generator = 1e-3\nlr_critic = 1e-3\nema_decay = 0.9\ncritic_warmup_steps = 4\n'
             + ('sharding = "fsdp2"\n' if sharded else "")
             + f'[gan]\ngenerator_weight = 3e-2\ncritic_weight = 1e-2\ndataset = "imagefolder:{tmp_path / "images"}"\n')
    path = unet2d_recipe(tmp_path / f"{name}.toml", teacher, tmp_path / "runs" / name, steps=STEPS, ratio=2, extra=extra)
    if not sharded:
        path.write_text(path.read_text().replace("batch_size = 2", "batch_size = 4"))
    return path


def weights(run, step, name):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))


@linux_only
def test_ema_weights_swap_in_and_out_of_a_sharded_network(monkeypatch):
    """The preview's swap of the generator's EMA weights on an FSDP2-sharded network (one gloo
    process): inside, the network computes with the EMA's weights; after, exactly with its own,
    also after a no-grad forward, which leaves FSDP2's root gathered. Without the reshard on the
    way out, the next forward ran on the EMA's root weights: the two-process runs below, which
    end within float noise of one process, did not see it."""
    import torch.distributed as dist
    from diffusers.training_utils import EMAModel

    from dmdcli import sharding
    from dmdcli.networks import MLPDenoiser

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = sharding.shard(MLPDenoiser(2), torch.device("cpu"), "no")
        ema = EMAModel(net.parameters(), decay=0.5)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        x, t = torch.randn(8, 2), torch.full((8,), 999)
        for _ in range(3):   # the weights and their EMA apart
            net(x, t).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.step(net.parameters())
        with torch.no_grad():
            net(x, t)   # as when the critic's turn makes fakes: the root stays gathered
            own = net(x, t)
            with sharding.ema_weights(net, ema):
                averaged = net(x, t)
            after = net(x, t)
        assert not torch.equal(averaged, own)
        assert torch.equal(after, own), (after - own).abs().max()
    finally:
        dist.destroy_process_group()


@linux_only
def test_sharded_run_trains_as_one_process_resumes_after_sigkill_and_exports(tmp_path):
    """Two sharded processes at batch 2 end where one unsharded process at batch 4 ends, with the
    same checkpoint files: the mean difference of the weights at 1% of how far they moved (float
    rounding; not the largest: AdamW's first steps turn gradients that are rounding noise around
    zero into steps of +-lr, the same for DDP, in about 1 weight in 10,000). A sharded
    run SIGKILLed after its first checkpoint and rerun ends bitwise equal to the uninterrupted
    one; its checkpoint exports to a diffusers folder that reproduces `dmd sample`."""
    one, two = sharded_recipe(tmp_path, "one", False), sharded_recipe(tmp_path, "two", True)
    # A checkpoint at step 4, before the generator's first step (critic warm-up), and a preview
    # with every checkpoint (it swaps the EMA weights in and out).
    every = ["--set", "run.checkpoint_every=4", "--set", "run.preview_samples=4"]
    first = run_dmd("distill", one, *every)
    assert first.returncode == 0, first.stderr
    second = launch(two, *every)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in (runs / "one" / "checkpoints" / f"step-{STEPS:08d}").iterdir() if "rng" not in p.name) \
        == sorted(p.name for p in (runs / "two" / "checkpoints" / f"step-{STEPS:08d}").iterdir() if "rng" not in p.name)
    for name in ("generator", "generator_ema", "critic"):
        start, a, b = weights(runs / "one", 4, name), weights(runs / "one", STEPS, name), weights(runs / "two", STEPS, name)
        assert a.keys() == b.keys()
        moved = torch.cat([(a[k] - start[k]).abs().flatten() for k in a]).mean()
        differ = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean()
        assert moved > 1e-4 and differ < 1e-2 * moved, (name, differ, moved)   # measured: 0.05% to 0.12%

    # SIGKILL after the step-4 checkpoint (the whole launch: launcher and both ranks), then rerun.
    killed = sharded_recipe(tmp_path, "killed", True)
    proc = subprocess.Popen(launch_command("distill", killed, *every), cwd=ROOT, env=launch_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and \
            not (runs / "killed" / "checkpoints" / "step-00000004").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (runs / "killed" / "checkpoints" / f"step-{STEPS:08d}").exists()
    rerun = launch(killed, *every)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr[-3000:]
    done, whole = runs / "killed" / "checkpoints" / f"step-{STEPS:08d}", runs / "two" / "checkpoints" / f"step-{STEPS:08d}"
    names = sorted(p.name for p in done.iterdir() if p.suffix == ".safetensors")
    assert names == sorted(p.name for p in whole.iterdir() if p.suffix == ".safetensors")
    for name in names:
        x, y = load_file(str(done / name)), load_file(str(whole / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name

    # The sharded run's checkpoint in a plain, one-process export and sample.
    out = tmp_path / "export"
    exported = run_dmd("export", runs / "two", "--out", out)
    assert exported.returncode == 0, exported.stderr
    from diffusers import UNet2DModel

    from dmdcli.runs import load_student

    _, _, generator, _ = load_student(runs / "two")
    unet = UNet2DModel.from_pretrained(out, subfolder="unet")
    ema = weights(runs / "two", STEPS, "generator_ema")   # what a run with an EMA exports and samples
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ema[f"unet.{k}"]), k
    for k, v in generator.state_dict().items():
        assert torch.equal(v, ema[k]), k


@linux_only
@pytest.mark.parametrize("setting, says", [
    ("", "train.sharding = 'fsdp2' shards over several processes and this run has one; launch it with "
         "`accelerate launch --multi_gpu --num_processes N dmd distill ...`, or set train.sharding = 'none'"),
    ("critic_ema_decay = 0.99\n", "train.critic_ema_decay keeps an unsharded copy of the critic and is not "
                                  "supported with train.sharding = 'fsdp2'; set it to 0 (the papers' setting)"),
])
def test_what_sharding_cannot_do_is_refused_in_one_line(tmp_path, setting, says):
    recipe = unet2d_recipe(tmp_path / "r.toml", save_tiny_unet2d(tmp_path / "teacher"), tmp_path / "runs" / "r",
                           extra='sharding = "fsdp2"\n' + setting)
    done = run_dmd("distill", recipe) if not setting else launch(recipe)
    assert done.returncode != 0 and says in done.stderr.replace("\n", ""), done.stderr[-3000:]
    assert f'File "{ROOT / "dmdcli"}' not in done.stderr
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()


@linux_only
def test_sharded_run_with_lora_gradient_checkpointing_bf16_and_previews(tmp_path):
    """What sharding keeps: a start from another run (train.init_from), the critic's LoRA
    adapters training while its base weights stay the teacher's, activation recomputation,
    FSDP2's bf16 policy, and a preview that every process takes part in and process 0 writes."""
    first = sharded_recipe(tmp_path, "first", False)
    assert run_dmd("distill", first, "--set", "train.steps=2", "--set", "train.lora_rank=2").returncode == 0
    recipe = sharded_recipe(tmp_path, "opts", True)
    done = launch(recipe, *[a for s in ("train.lora_rank=2", "train.gradient_checkpointing=true",
                                        "train.mixed_precision='bf16'", "run.preview_samples=4",
                                        f"train.init_from='{tmp_path / 'runs' / 'first'}'")
                            for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generator from generator_ema.safetensors" in done.stderr   # train.init_from, read sharded
    run = tmp_path / "runs" / "opts"
    assert (run / "previews" / f"step-{STEPS:08d}.png").is_file()
    critic = weights(run, STEPS, "critic")
    teacher = load_file(str(tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = {k: v for k, v in critic.items() if ".base_layer." in k}
    assert base and all(torch.equal(v, teacher[k.removeprefix("critic.unet.").replace(".base_layer.", ".")])
                        for k, v in base.items())
    lora_b = [v for k, v in critic.items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0   # zero at the start
