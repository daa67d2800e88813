"""`dmd export`: a student as an ordinary diffusers folder.

SD students become a StableDiffusionPipeline whose UNet is the student and whose scheduler
is LCMScheduler, which returns x0 at the conditioning timestep (SPEC section 10: a one-step
checkpoint beside a many-step scheduler produces noise). For several steps LCMScheduler
re-noises x0 to the next timestep, which is DMD2's few-step sampling. Pixel students become
unet/ + scheduler/. Each folder carries a model card (README.md) with the recipe, the
teacher, the steps and usage code. Written beside the target and renamed when complete.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from .errors import UserError
from .io import write_text
from .recipe import to_toml
from .networks import merge_lora
from .runs import load_student

CARD = """---
library_name: diffusers
tags: [dmd, distribution-matching-distillation, one-step]
---
# One-step student distilled with dmd

- Teacher: `{teacher}` ({name})
- Method: {method}, {steps} step(s) at timesteps {timesteps}, checkpoint step {ckpt_step}
- Guidance baked in: {guidance} (standard CFG form, on the real score during distillation)
- FID: {fid}

## Use

```python
{usage}
```

## Recipe

```toml
{recipe}```
"""

SD_USAGE = """import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{out}")
image = pipe("a photo of a cat", num_inference_steps={steps}, timesteps={timesteps}, guidance_scale=1.0).images[0]"""

UNET_USAGE = """import torch
from diffusers import LCMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{out}", subfolder="unet")
scheduler = LCMScheduler.from_pretrained("{out}", subfolder="scheduler")
scheduler.set_timesteps(timesteps={timesteps})
x = torch.randn(16, *{shape}){labels}
with torch.no_grad():
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t{class_arg}).sample, t, x).prev_sample   # images in [-1, 1]"""


def export(run: str | Path, out: Path, fid: str = "not measured") -> Path:
    from diffusers import LCMScheduler

    recipe, teacher, generator, step = load_student(run, device="cpu")
    if teacher.name not in ("sd", "unet2d"):
        raise UserError(f"export writes diffusers folders for the sd and unet2d teachers; this run's teacher "
                        f"is {teacher.name!r} (its student is in {run}/checkpoints as safetensors)")
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and "distilled with dmd" not in _card(out):
        raise UserError(f"{out} exists and is not an earlier export (no dmd model card); give a new or empty folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The student's x0 is used as it is (never clipped), so the exported scheduler must not clip.
    known = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in teacher.scheduler_config.items() if k in known}
    scheduler = LCMScheduler.from_config({**config, "timestep_spacing": "trailing", "clip_sample": False,
                                          "thresholding": False, "prediction_type": generator.prediction_type})
    ts = list(recipe.student.timesteps)
    unet = generator.unet.float()
    merge_lora(unet)   # LoRA students ship as plain UNets, adapters merged
    if teacher.name == "sd":
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        from . import hub

        m, rev = recipe.teacher.sd.model, recipe.teacher.sd.revision
        pipe = StableDiffusionPipeline(
            unet=unet, scheduler=scheduler, vae=hub.load(AutoencoderKL, m, "vae", rev),
            text_encoder=hub.load(CLIPTextModel, m, "text_encoder", rev),
            tokenizer=hub.load(CLIPTokenizer, m, "tokenizer", rev),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        usage = SD_USAGE.format(out=out, steps=len(ts), timesteps=ts)
    else:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        conditional = teacher.num_classes is not None
        usage = UNET_USAGE.format(out=out, timesteps=ts, shape=tuple(teacher.sample_shape),
                                  labels=f"\nlabels = torch.arange(16) % {teacher.num_classes}" if conditional else "",
                                  class_arg=", class_labels=labels" if conditional else "")
    write_text(tmp / "README.md", CARD.format(
        teacher=teacher.describe().get("model", teacher.name), name=teacher.name, method=recipe.train.method,
        steps=len(ts), timesteps=ts, ckpt_step=step, guidance=recipe.teacher.guidance, fid=fid, usage=usage,
        recipe=to_toml(recipe)))
    # Swap in the new export; the old one goes only once the new one is in place.
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _card(folder: Path) -> str:
    card = folder / "README.md"
    return card.read_text(errors="replace") if card.is_file() else ""
