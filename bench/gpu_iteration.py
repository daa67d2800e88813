"""Time a DMD2 iteration of SD1.5's and ImageNet-64's architectures on a GPU, with random
weights at the recipe's batch per GPU, and record the peak memory next to `distill
--dry-run`'s estimate (issue 26). One call, about 5 minutes on an H100; nothing is downloaded.

    python bench/gpu_iteration.py --out $OUT              # sd15 (checkpointing on and off), imagenet64
    python bench/gpu_iteration.py --tiny --out runs/gpu-bench-tiny   # the same mechanics on a CPU, in seconds

For each case: a random-weight teacher of the architecture is saved as an ordinary folder (a
diffusers Stable Diffusion folder; a dmd-edm/1 folder), the shipped recipe is loaded with that
teacher, the real trainer runs `--warmup` iterations, then `--iters` timed ones (generator
turns included: the recipes' TTUR ratio decides how many), and torch.cuda.max_memory_allocated
is read. Writes gpu_iteration.json and prints a table.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def sd_folder(folder: Path, tiny: bool) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dmdcli.teachers.architectures import SD15

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())   # a byte-level vocabulary: no download
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{s: i + 2 for i, s in enumerate(symbols)}}
    vocab.update({s + "</w>": len(vocab) + i for i, s in enumerate(symbols)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    cfg = {k: dict(v) for k, v in SD15.items()}
    if tiny:
        cfg["unet"].update(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
        cfg["vae"].update(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
        cfg["text_encoder"].update(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                   projection_dim=32)
    text = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], "vocab_size": max(len(vocab), 49408 if not tiny
                                                                                        else len(vocab)),
                                           "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    StableDiffusionPipeline(unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]),
                            text_encoder=text, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def edm_folder(folder: Path, tiny: bool) -> Path:
    from safetensors.torch import save_file

    from dmdcli.teachers.architectures import EDM_IMAGENET64
    from dmdcli.teachers.edm import build_network

    config = dict(EDM_IMAGENET64)
    if tiny:
        config.update(img_resolution=16, label_dim=10, model=dict(model_channels=32, channel_mult=[1, 2],
                                                                  channel_mult_emb=2, num_blocks=1,
                                                                  attn_resolutions=[8], dropout=0.0, augment_dim=0))
    folder.mkdir(parents=True)
    net = build_network(config)
    save_file({f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": config["format"]})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def image_folder(folder: Path, size: int) -> Path:
    """Random real images in two classes, for the GAN term."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


def run_case(name: str, recipe_file: str, overrides: list[str], warmup: int, iters: int) -> dict:
    from dmdcli.dryrun import estimate
    from dmdcli.recipe import load_recipe
    from dmdcli.teachers import build_teacher
    from dmdcli.trainer import DMDTrainer

    r = load_recipe(recipe_file, overrides)
    _, _, predicted = estimate(r, build_teacher(r.teacher))
    cuda = torch.cuda.is_available()
    trainer = DMDTrainer(r)
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() if cuda else None
    out = {"case": name, "batch": r.train.batch_size, "checkpointing": r.train.gradient_checkpointing,
           "seconds_per_iteration": seconds, "peak_allocated_gib": peak / 2 ** 30 if peak else None,
           "dry_run_estimate_gib": predicted / 2 ** 30,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU: checks the mechanics")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cases", default="sd15,sd15-nockpt,imagenet64")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of thing number {i}" for i in range(64)) + "\n")
    common = [f'run.out="{work / "run"}"', "run.preview_samples=0", "run.checkpoint_every=100000",
              'run.log_with="none"'] + (['train.mixed_precision="no"', "train.batch_size=2"] if a.tiny else [])
    results = []
    for case in a.cases.split(","):
        if case.startswith("sd15"):
            folder = work / "sd15" if (work / "sd15").exists() else sd_folder(work / "sd15", a.tiny)
            over = [f'teacher.sd.model="{folder}"', f'teacher.sd.prompts="{prompts}"',
                    f"train.gradient_checkpointing={'false' if case.endswith('nockpt') else 'true'}"]
            results.append(run_case(case, "recipes/sd15.toml", common + over, a.warmup, a.iters))
        elif case == "imagenet64":
            folder = edm_folder(work / "edm", a.tiny)
            images = image_folder(work / "images", 16 if a.tiny else 64)
            over = [f'teacher.edm.model="{folder}"', f'gan.dataset="imagefolder:{images}"']
            results.append(run_case(case, "recipes/imagenet64.toml", common + over, a.warmup, a.iters))
        print(json.dumps(results[-1]), flush=True)
    (a.out / "gpu_iteration.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'case':<14}{'batch':>6}{'ckpt':>6}{'s/it':>8}{'peak GiB':>10}{'dry run GiB':>13}")
    for r in results:
        peak = f"{r['peak_allocated_gib']:.1f}" if r["peak_allocated_gib"] is not None else "-"
        print(f"{r['case']:<14}{r['batch']:>6}{str(r['checkpointing']):>6}{r['seconds_per_iteration']:>8.2f}"
              f"{peak:>10}{r['dry_run_estimate_gib']:>13.1f}")


if __name__ == "__main__":
    main()
