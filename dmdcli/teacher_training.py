"""`dmd train-teacher`: a class-conditional diffusers UNet2DModel trained with the DDPM
epsilon loss, label dropout to a null class (for classifier-free guidance) and an EMA of the
weights; checkpoints and resume as in `distill`. The EMA network is saved as a diffusers
folder (`teacher/unet`, `teacher/scheduler`) that the `unet2d` teacher loads."""

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

from . import checkpoint
from .datasets import load_images
from .io import write_text
from .recipe import TeacherRecipe, to_toml
from .stopping import StopRequest, Stopped
from .runner import check_same_run

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": False}


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


def train_teacher(r: TeacherRecipe, progress_factory=None, console=None) -> Path:
    run_dir = Path(r.run.out)
    check_same_run(run_dir, r)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    images, labels, classes = load_images(r.data.dataset, "train", r.data.image_size, r.data.limit)
    torch.manual_seed(r.run.seed)
    unet = build_unet(r, images.shape[1], classes)
    ema = EMAModel(unet.parameters(), decay=r.train.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=r.train.lr, weight_decay=r.train.weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=r.train.warmup_steps)
    noise_sched = DDPMScheduler(**SCHEDULER)
    unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    rng = torch.Generator().manual_seed(r.run.seed)
    step = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "recipe.toml", to_toml(r))
    last = checkpoint.latest_valid(run_dir)
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
            y[torch.rand(len(y), generator=rng) < r.train.class_dropout] = classes
            t = torch.randint(0, SCHEDULER["num_train_timesteps"], (len(x0),), generator=rng)
            eps = torch.randn(x0.shape, generator=rng)
            t, eps, y = t.to(acc.device), eps.to(acc.device), y.to(acc.device)
            pred = unet(noise_sched.add_noise(x0, eps, t), t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), eps)
            acc.backward(loss)
            acc.clip_grad_norm_(unet.parameters(), r.train.grad_clip)
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
    export_teacher(acc.unwrap_model(unet), ema, noise_sched, run_dir / "teacher")
    return run_dir / "teacher"


def export_teacher(unet: UNet2DModel, ema: EMAModel, noise_sched: DDPMScheduler, out: Path) -> None:
    """The EMA weights as a diffusers folder, written beside `out` and renamed into place."""
    model = UNet2DModel.from_config(unet.config)
    ema.copy_to(model.parameters())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "unet")
    noise_sched.save_pretrained(tmp / "scheduler")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

