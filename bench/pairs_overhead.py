"""Pairs per second of `make_pairs` against the plain diffusers pipeline call and against
the teacher UNet's own time, same sampler (DDIM), steps, guidance and batch, in one run.

Usage: .venv/bin/python bench/pairs_overhead.py [--num 64] [--batch 16] [--steps 20] [--rounds 3]
The paths run interleaved, `--rounds` times each, in a rotated order; the best time of each
counts. `teacher_pairs` is make_pairs without the files (noise, conditions, ODE). On a noisy
machine the decisive figure is measured inside one call: forward hooks on the teacher UNet
time its calls, and the overhead is the rest of the wall time of that same call.
The teacher is a random-weight SD-architecture model (UNet block_out_channels (64, 128),
latents 4x32x32, CLIP width 32) built on the fly: no download, the network's cost is real.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import byte_level_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    tok = byte_level_clip_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=16))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from diffusers import StableDiffusionPipeline

    from dmdcli.teachers.diffusers_unets import SDTeacher
    from dmdcli.pairs import PairSettings, make_pairs, pair_noise, teacher_pairs
    from dmdcli.recipe import SDConfig

    tmp = Path(tempfile.mkdtemp())
    folder = build(tmp / "sd")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(100)))
    teacher = SDTeacher(SDConfig(model=str(folder), prompts=str(prompts)))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rounds = a.num // a.batch
    texts = teacher.prompts[: a.batch]

    def network_only():
        x = torch.randn(2 * a.batch, *teacher.sample_shape)
        emb = torch.cat([teacher.encode_text([""] * a.batch), teacher.encode_text(texts)])
        with torch.no_grad():
            for _ in range(rounds * a.steps):
                teacher.real.unet(x, torch.full((2 * a.batch,), 500), encoder_hidden_states=emb)

    def pipeline():
        for r in range(rounds):
            z = pair_noise(0, range(r * a.batch, (r + 1) * a.batch), teacher.sample_shape)
            pipe(texts, num_inference_steps=a.steps, guidance_scale=a.guidance, latents=z, output_type="latent")

    def ours():
        make_pairs(teacher, tmp / f"pairs-{time.time()}", a.num,
                   PairSettings(steps=a.steps, guidance=a.guidance, shard_size=a.num), batch_size=a.batch)

    def ode_only():
        settings = PairSettings(steps=a.steps, guidance=a.guidance)
        for r in range(rounds):
            teacher_pairs(teacher, range(r * a.batch, (r + 1) * a.batch), settings)

    unet_seconds = [0.0]

    def start(module, args):
        module._t0 = time.perf_counter()

    def stop(module, args, output):
        unet_seconds[0] += time.perf_counter() - module._t0

    for unet in (teacher.real.unet, pipe.unet):
        unet.register_forward_pre_hook(start)
        unet.register_forward_hook(stop)
    times, inside = {}, {}
    paths = [("network", network_only), ("pipeline", pipeline), ("teacher_pairs", ode_only), ("make_pairs", ours)]
    for r in range(a.rounds):
        for name, fn in paths[r % len(paths):] + paths[:r % len(paths)]:
            unet_seconds[0] = 0.0
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            times.setdefault(name, []).append(wall)
            inside.setdefault(name, []).append(wall / unet_seconds[0] - 1)
    best = {k: min(v) for k, v in times.items()}
    print(f"{a.num} pairs, batch {a.batch}, DDIM {a.steps} steps, guidance {a.guidance}, "
          f"torch threads {torch.get_num_threads()}")
    for k, v in best.items():
        print(f"  {k:13s} {v:7.2f} s  {a.num / v:7.2f} pairs/s   (all rounds: {', '.join(f'{t:.2f}' for t in times[k])})")
    print(f"  make_pairs overhead over the teacher network: {100 * (best['make_pairs'] / best['network'] - 1):+.1f}%")
    print(f"  make_pairs against the diffusers pipeline:   {100 * (best['make_pairs'] / best['pipeline'] - 1):+.1f}%")
    print(f"  teacher_pairs over the teacher network:      {100 * (best['teacher_pairs'] / best['network'] - 1):+.1f}%")
    print("  within each call, wall time over the UNet's own time (forward hooks), per round:")
    for k, v in inside.items():
        print(f"    {k:13s} {', '.join(f'{100 * x:+.1f}%' for x in v)}   median {100 * sorted(v)[len(v) // 2]:+.1f}%")


if __name__ == "__main__":
    main()
