"""`dmd export`: a student as an ordinary diffusers folder.

SD students become a StableDiffusionPipeline whose UNet is the student and whose scheduler
is LCMScheduler (SDXL students: a StableDiffusionXLPipeline; SD3 students: a
StableDiffusion3Pipeline with FlowMatchLCMScheduler), which returns x0 at the conditioning timestep (SPEC section 10: a one-step
checkpoint beside a many-step scheduler produces noise). For several steps LCMScheduler
re-noises x0 to the next timestep, which is DMD2's few-step sampling. Pixel students become
unet/ + scheduler/. EDM students are ADM networks, not diffusers models: they become a
`dmd-edm/1` folder (config.json with the student's sigma, model.safetensors) read with
dmdcli.teachers.edm, as the teacher's own format. Each folder carries a model card (README.md) with the recipe, the
teacher, the steps and usage code. Written beside the target and renamed when complete.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import torch

from .utils.errors import UserError
from .utils.io import write_text
from .recipe import to_toml
from .networks import merge_lora
from .runs import load_student

CARD = """---
library_name: {library}
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
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{out}")
image = pipe("a photo of a cat", num_inference_steps={steps}, timesteps={timesteps}, guidance_scale=1.0).images[0]"""

# SD3 students: FlowMatchLCMScheduler given the student's own sigmas (see UNET_USAGE).
SD3_USAGE = """import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{out}")
image = pipe("a photo of a cat", sigmas={sigmas}, guidance_scale=1.0).images[0]"""

# Pixel UNet students: LCMScheduler, or for flow students FlowMatchLCMScheduler, DMD2's
# few-step rule for flow (x0 = x - sigma v, then re-noise to the next sigma) given the student's
# own sigmas (already shifted, so the exported scheduler's shift is 1).
UNET_USAGE = """import torch
from diffusers import {scheduler}, UNet2DModel

unet = UNet2DModel.from_pretrained("{out}", subfolder="unet")
scheduler = {scheduler}.from_pretrained("{out}", subfolder="scheduler")
scheduler.set_timesteps({schedule})
x = torch.randn(16, *{shape}){labels}
with torch.no_grad():
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t{class_arg}).sample, t, x).prev_sample   # images in [-1, 1]"""


EDM_USAGE = """import torch
from dmdcli.teachers.edm import EDMDenoiser, build_network, load_edm_folder

config, weights = load_edm_folder("{out}")
net = EDMDenoiser(build_network(config, weights), config["label_dim"], torch.zeros(1), config["sigma_data"]).eval()
student = config["student"]   # the noise enters times input_scale at sigmas[0]; later steps re-noise
z = torch.randn(16, *{shape}){labels}
x = z * student["input_scale"]
with torch.no_grad():
    for i, sigma in enumerate(student["sigmas"]):
        x0 = net.denoise_sigma(x, torch.tensor(sigma), {label_arg})
        x = x0 + student["sigmas"][i + 1] * torch.randn_like(x0) if i + 1 < len(student["sigmas"]) else x0
# x: images in [-1, 1]"""

# What export writes for an EDM run, said once (it cannot be a diffusers folder).
EDM_NOTE = ("the edm student is EDM's ADM network, which diffusers has no class for: written as a dmd-edm/1 "
            "folder (config.json, model.safetensors) that dmdcli.teachers.edm loads, with usage in its README.md")


def export(run: str | Path, out: Path, fid: str = "not measured", float16: bool = False) -> tuple[Path, str | None]:
    """Write the student; returns the folder and a note on what it is where that is not a
    diffusers folder. float16: the weights in half precision (half the size; loaded back in
    the teacher's dtype)."""
    from diffusers import LCMScheduler

    recipe, teacher, generator, step = load_student(run, device="cpu")
    if teacher.name not in ("sd", "unet2d", "edm"):
        raise UserError(f"export writes students of the sd, unet2d and edm teachers; this run's teacher "
                        f"is {teacher.name!r} (its student is in {run}/checkpoints as safetensors)")
    shown = Path(out)   # the model card's usage names the folder as the user gave it (no machine paths)
    out = shown.resolve()
    if out.exists() and any(out.iterdir()) and "distilled with dmd" not in _card(out):
        raise UserError(f"{out} exists and is not an earlier export (no dmd model card); give a new or empty folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ts = list(recipe.student.timesteps)
    if teacher.name == "edm":
        _write_edm(tmp, teacher, generator, ts, step, torch.float16 if float16 else torch.float32)
        write_text(tmp / "recipe.toml", to_toml(recipe))   # so that sample and compare read the folder
        conditional = bool(teacher.num_classes)
        usage = EDM_USAGE.format(out=shown, shape=tuple(teacher.sample_shape),
                                 labels=f"\nlabels = torch.arange(16) % {teacher.num_classes}" if conditional else "",
                                 label_arg="labels" if conditional else "None")
        _finish(tmp, out, recipe, teacher, step, fid, usage)
        return out, EDM_NOTE
    if teacher.family == "flow":
        if generator.prediction_type != "flow":
            raise UserError(f"export writes flow students that predict the velocity (student.prediction_type = "
                            f"'teacher'); this run's student is in {run}/checkpoints")
        from diffusers import FlowMatchLCMScheduler

        # Only the length: the sigmas given are the student's own (already shifted), and keys
        # such as shift_terminal or use_karras_sigmas would alter them in set_timesteps.
        scheduler = FlowMatchLCMScheduler(num_train_timesteps=teacher.schedule.num_train_timesteps, shift=1.0)
    else:
        # The student's x0 is used as it is (never clipped), so the exported scheduler must not clip.
        known = inspect.signature(LCMScheduler.__init__).parameters
        config = {k: v for k, v in teacher.scheduler_config.items() if k in known}
        scheduler = LCMScheduler.from_config({**config, "timestep_spacing": "trailing", "clip_sample": False,
                                              "thresholding": False, "prediction_type": generator.prediction_type})
    unet = generator.unet.to(torch.float16 if float16 else torch.float32)
    merge_lora(unet)   # LoRA students ship as plain UNets, adapters merged
    if teacher.name == "sd" and teacher.family == "flow":
        _write_sd3(tmp, recipe.teacher.sd, unet, scheduler)
        usage = SD3_USAGE.format(out=shown, sigmas=[float(teacher.schedule.sigmas[t]) for t in ts])
    elif teacher.name == "sd" and teacher.describe().get("kind") == "sdxl":
        _write_sdxl(tmp, recipe.teacher.sd, unet, scheduler, teacher.zero_unconditional)
        usage = SD_USAGE.format(out=shown, steps=len(ts), timesteps=ts, pipeline="StableDiffusionXLPipeline")
    elif teacher.name == "sd":
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        from .teachers import hub

        m, rev = recipe.teacher.sd.model, recipe.teacher.sd.revision
        pipe = StableDiffusionPipeline(
            unet=unet, scheduler=scheduler, vae=hub.load(AutoencoderKL, m, "vae", rev),
            text_encoder=hub.load(CLIPTextModel, m, "text_encoder", rev),
            tokenizer=hub.load(CLIPTokenizer, m, "tokenizer", rev),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        usage = SD_USAGE.format(out=shown, steps=len(ts), timesteps=ts, pipeline="StableDiffusionPipeline")
    else:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        conditional = teacher.num_classes is not None
        schedule = f"sigmas={[float(teacher.schedule.sigmas[t]) for t in ts]}" if teacher.family == "flow" \
            else f"timesteps={ts}"
        usage = UNET_USAGE.format(out=shown, scheduler=type(scheduler).__name__, schedule=schedule,
                                  shape=tuple(teacher.sample_shape),
                                  labels=f"\nlabels = torch.arange(16) % {teacher.num_classes}" if conditional else "",
                                  class_arg=", class_labels=labels" if conditional else "")
    _finish(tmp, out, recipe, teacher, step, fid, usage)
    return out, None


def _write_sdxl(tmp: Path, cfg, unet, scheduler, zero_unconditional: bool) -> None:
    """A StableDiffusionXLPipeline: the student UNet with the teacher's VAE, encoders and tokenisers."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .teachers import hub

    m, rev = cfg.model, cfg.revision
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=hub.load(AutoencoderKL, m, "vae", rev),
        text_encoder=hub.load(CLIPTextModel, m, "text_encoder", rev),
        text_encoder_2=hub.load(CLIPTextModelWithProjection, m, "text_encoder_2", rev),
        tokenizer=hub.load(CLIPTokenizer, m, "tokenizer", rev), tokenizer_2=hub.load(CLIPTokenizer, m, "tokenizer_2", rev),
        force_zeros_for_empty_prompt=zero_unconditional)
    pipe.save_pretrained(tmp, safe_serialization=True)


def _write_sd3(tmp: Path, cfg, transformer, scheduler) -> None:
    """A StableDiffusion3Pipeline: the student transformer with the teacher's VAE, encoders and tokenisers."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from .teachers import hub

    from .teachers.sd3 import has_t5

    m, rev = cfg.model, cfg.revision
    t5 = has_t5(m)
    parts = {f"text_encoder{s}": hub.load(CLIPTextModelWithProjection, m, f"text_encoder{s}", rev) for s in ("", "_2")}
    parts |= {f"tokenizer{s}": hub.load(CLIPTokenizer, m, f"tokenizer{s}", rev) for s in ("", "_2")}
    parts |= {"text_encoder_3": hub.load(T5EncoderModel, m, "text_encoder_3", rev) if t5 else None,
              "tokenizer_3": hub.load(T5TokenizerFast, m, "tokenizer_3", rev) if t5 else None}
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler,
                                    vae=hub.load(AutoencoderKL, m, "vae", rev), **parts)
    pipe.save_pretrained(tmp, safe_serialization=True)


def _write_edm(tmp: Path, teacher, generator, timesteps: list[int], step: int, dtype) -> None:
    import json

    from safetensors.torch import save_file

    from .teachers.edm import FORMAT

    sigmas = [float(teacher.schedule.sigmas[t]) for t in timesteps]
    config = {**teacher.config, "source": "dmd export", "unconditional": False,
              "student": {"timesteps": timesteps, "sigmas": sigmas, "checkpoint_step": step,
                          "input_scale": float(teacher.schedule.init_noise_sigma)}}
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in generator.model.state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _finish(tmp: Path, out: Path, recipe, teacher, step: int, fid: str, usage: str) -> None:
    """The model card, then the new folder swapped in for an old export."""
    ts = list(recipe.student.timesteps)
    write_text(tmp / "README.md", CARD.format(
        library="dmd" if teacher.name == "edm" else "diffusers",
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


def _card(folder: Path) -> str:
    card = folder / "README.md"
    return card.read_text(errors="replace") if card.is_file() else ""
