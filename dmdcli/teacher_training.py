"""`dmd train-teacher`: a class-conditional diffusion teacher with label dropout to a null class
(for classifier-free guidance) and an EMA of the weights; checkpoints and resume as in `distill`.

Two families (recipe `model.family`), each saved where its teacher adapter loads it:
- `vp`: a diffusers UNet2DModel, DDPM linear schedule, epsilon loss; the EMA network as a
  diffusers folder (`teacher/unet`, `teacher/scheduler`) for the `unet2d` teacher.
- `edm`: EDM's ADM network behind EDM's preconditioning, trained with EDM's loss (Karras et
  al. 2022, section 5 and table 1): ln sigma ~ N(p_mean, p_std^2), weight
  (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error; the EMA network as a
  `dmd-edm/1` folder (config.json, model.safetensors) for the `edm` teacher, the same format
  `dmd convert-teacher` makes of EDM's own ImageNet-64 checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from .utils import checkpoint
from .datasets import load_images
from .teachers.edm import FORMAT, EDMDenoiser, build_network
from .utils.errors import UserError
from .utils.io import write_text
from .recipe import TeacherRecipe, to_toml
from .runner import check_same_run
from .schedules import EDMSchedule
from .utils.stopping import StopRequest, Stopped

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": False}


SIGMA_DATA = 0.5   # EDM table 1


def build_unet(r: TeacherRecipe, channels: int, classes: int) -> UNet2DModel:
    levels = len(r.model.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if r.model.attention_at_lowest:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=r.data.image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(r.model.block_out_channels), layers_per_block=r.model.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=8,
                       num_class_embeds=classes + 1)   # the last embedding is the null class


class VPTeacherTraining:
    """UNet2DModel, DDPM epsilon loss; the null class is the last class embedding."""

    def __init__(self, r: TeacherRecipe, channels: int, classes: int):
        self.net, self.null = build_unet(r, channels, classes), classes
        self.noise_sched = DDPMScheduler(**SCHEDULER)

    def loss(self, net, x0, y, rng, device):
        t = torch.randint(0, SCHEDULER["num_train_timesteps"], (len(x0),), generator=rng)
        eps = torch.randn(x0.shape, generator=rng)
        t, eps = t.to(device), eps.to(device)
        return F.mse_loss(net(self.noise_sched.add_noise(x0, eps, t), t, class_labels=y).sample.float(), eps)

    def export(self, ema: EMAModel, out: Path) -> None:
        model = UNet2DModel.from_config(self.net.config)
        ema.copy_to(model.parameters())
        with _replace_folder(out) as tmp:
            model.save_pretrained(tmp / "unet")
            self.noise_sched.save_pretrained(tmp / "scheduler")

    def used_with(self, out: Path) -> str:
        return f'teacher.name = "unet2d", teacher.unet2d.model = "{out}"'


def adm_config(r: TeacherRecipe, channels: int, classes: int, dropout_trained: bool) -> dict:
    """The `dmd-edm/1` config of the recipe's ADM network (EDM's DhariwalUNet layout)."""
    m = r.model
    base = m.block_out_channels[0]
    if any(c % base for c in m.block_out_channels):
        raise UserError(f"model.block_out_channels = {m.block_out_channels}: for family 'edm' every entry must be "
                        f"a multiple of the first (ADM's model_channels * channel_mult)")
    if m.attention_at_lowest and m.block_out_channels[-1] < 64:
        raise UserError(f"model.block_out_channels = {m.block_out_channels}: ADM's attention has 64 channels a head, "
                        f"so the last entry must be at least 64, or set model.attention_at_lowest = false")
    lowest = r.data.image_size >> (len(m.block_out_channels) - 1)
    arch = dict(model_channels=base, channel_mult=[c // base for c in m.block_out_channels], channel_mult_emb=4,
                num_blocks=m.layers_per_block, attn_resolutions=[lowest] if m.attention_at_lowest else [],
                dropout=m.dropout, augment_dim=0)
    return {"format": FORMAT, "architecture": "adm", "img_resolution": r.data.image_size, "img_channels": channels,
            "label_dim": classes, "sigma_data": SIGMA_DATA, "sigma_min": 0.002, "sigma_max": 80.0,
            "unconditional": dropout_trained, "source": "dmd train-teacher", "model": arch}


class EDMTeacherTraining:
    """ADM behind EDM's preconditioning; label `classes` (dropped labels) is the zero vector,
    EDM's unconditional input."""

    def __init__(self, r: TeacherRecipe, channels: int, classes: int):
        self.r, self.null = r, classes
        self.config = adm_config(r, channels, classes, r.train.class_dropout > 0)
        self.net = EDMDenoiser(build_network(self.config), classes, EDMSchedule().sigmas, SIGMA_DATA)

    def loss(self, net, x0, y, rng, device):
        sigma = (torch.randn(len(x0), generator=rng) * self.r.train.p_std + self.r.train.p_mean).exp()
        noise = torch.randn(x0.shape, generator=rng)
        sigma, noise = sigma.to(device).reshape(-1, 1, 1, 1), noise.to(device)
        weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        return (weight * (net.denoise_sigma(x0 + sigma * noise, sigma, y) - x0) ** 2).mean()

    def export(self, ema: EMAModel, out: Path) -> None:
        model = build_network(self.config)
        ema.copy_to(model.parameters())
        with _replace_folder(out) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
                      metadata={"format": FORMAT})
            write_text(tmp / "config.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def used_with(self, out: Path) -> str:
        return f'teacher.name = "edm", teacher.edm.model = "{out}"'


@contextlib.contextmanager
def _replace_folder(out: Path):
    """Write a folder beside `out`, then rename it into place (an old `out` is replaced)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train_teacher(r: TeacherRecipe, progress_factory=None, console=None) -> tuple[Path, str]:
    """Train (or resume) a teacher; returns its exported folder and how a recipe names it."""
    run_dir = Path(r.run.out)
    check_same_run(run_dir, r)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.num_processes > 1:   # every process would write the same checkpoints and metrics
        raise UserError("train-teacher runs as one process; start it with `dmd train-teacher`, not under "
                        "accelerate launch or torchrun")
    images, labels, classes = load_images(r.data.dataset, "train", r.data.image_size, r.data.limit)
    torch.manual_seed(r.run.seed)
    family = (EDMTeacherTraining if r.model.family == "edm" else VPTeacherTraining)(r, images.shape[1], classes)
    unet = family.net
    ema = EMAModel(unet.parameters(), decay=r.train.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=r.train.lr, weight_decay=r.train.weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=r.train.warmup_steps)
    unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    rng = torch.Generator().manual_seed(r.run.seed)
    step = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "recipe.toml", to_toml(r))
    last = checkpoint.newest_for_all(run_dir)
    if last is not None:
        acc.unwrap_model(unet).load_state_dict(load_file(str(last / "unet.safetensors")))
        state = checkpoint.load_tree(last, "state")
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        ema.load_state_dict(state["ema"])
        ema.to(acc.device)
        rng.set_state(state["rng"])
        step = state["step"]
        if console:
            console.print(f"resuming {run_dir} from {last.name}")
    progress = progress_factory() if (progress_factory and acc.is_main_process) else None
    t0, loss_sum, n = time.time(), 0.0, 0
    with progress or contextlib.nullcontext(), StopRequest() as stop:
        task = progress.add_task("teacher", total=r.train.steps, completed=step, losses="") if progress else None
        while step < r.train.steps:
            idx = torch.randint(0, len(images), (r.train.batch_size,), generator=rng)
            x0, y = images[idx].to(acc.device), labels[idx].clone()
            y[torch.rand(len(y), generator=rng) < r.train.class_dropout] = family.null
            loss = family.loss(unet, x0, y.to(acc.device), rng, acc.device)
            acc.backward(loss)
            acc.clip_grad_norm_(unet.parameters(), r.train.grad_clip or float("inf"))   # 0: off
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(acc.unwrap_model(unet).parameters())
            step += 1
            loss_sum, n = loss_sum + loss.item(), n + 1
            at_checkpoint = step % r.run.checkpoint_every == 0 or step == r.train.steps
            if step % r.run.log_every == 0 or at_checkpoint:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss_sum / n, "seconds": time.time() - t0}) + "\n")
                if progress:
                    progress.update(task, losses=f"loss {loss_sum / n:.4f}")
                loss_sum, n = 0.0, 0
            if progress:
                progress.update(task, completed=step)
            if at_checkpoint or stop.requested:
                tmp = checkpoint.begin(run_dir, step)
                save_file(acc.unwrap_model(unet).state_dict(), str(tmp / "unet.safetensors"))
                checkpoint.save_tree(tmp, "state", {"step": step, "opt": opt.state_dict(), "rng": rng.get_state(),
                                                    "lr_sched": lr_sched.state_dict(), "ema": ema.state_dict()})
                checkpoint.commit(tmp, step, r.run.keep_checkpoints)
            if stop.requested:
                raise Stopped(stop.signum, f"stopped at step {step} with a checkpoint; run the same command "
                                           f"again to resume")
    out = run_dir / "teacher"
    family.export(ema, out)
    return out, family.used_with(out)
