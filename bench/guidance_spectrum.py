"""How much of the guidance term is pixel grain, timestep by timestep? On real images x noised to
x_t, the teacher's guided and conditional x0 predictions differ by (s - 1)(x0_c - x0_u): this is
what DMD's real score adds over the plain conditional score. Prints, per timestep, its mean size,
its size over DMD's normaliser mean|x - x0_guided| (as it enters the DM gradient), and the share of
its energy above a 3x3 box blur (high-frequency; the images' own share is printed first).

Usage: .venv/bin/python bench/guidance_spectrum.py RECIPE [--num 512] [--dataset fashion-mnist]
           [--timesteps 20,50,100,200,300,400,600,800,950]
VP teachers with guidance (the recipe's teacher.guidance); BENCHMARKS.md has the Fashion-MNIST figures.
"""

import argparse

import torch

from grain import high_frequency   # bench/grain.py, beside this file
from dmdcli.datasets import load_images
from dmdcli.recipe import load_recipe
from dmdcli.teachers import build_teacher


def high_frequency_share(d: torch.Tensor) -> float:
    """Share of the energy of d above a 3x3 box blur."""
    return float((high_frequency(d) ** 2).sum() / (d ** 2).sum())


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--timesteps", default="20,50,100,200,300,400,600,800,950")
    a = ap.parse_args()
    r = load_recipe(a.recipe)
    teacher = build_teacher(r.teacher)
    x, labels = load_images(a.dataset, "test", image_size=teacher.sample_shape[-1], limit=a.num)[:2]
    g = torch.Generator().manual_seed(0)
    print(f"guidance {r.teacher.guidance}, {len(x)} test images; their own high-frequency share: "
          f"{high_frequency_share(x):.3f}\n")
    print("| timestep | mean abs guidance term | the same over mean abs(x - guided x0), as in the DM gradient | high-frequency share |\n"
          "|---|---|---|---|")
    for t in map(int, a.timesteps.split(",")):
        tt = torch.full((len(x),), t)
        x_t = teacher.schedule.add_noise(x, torch.randn(x.shape, generator=g), tt)
        cond = teacher.denoise(x_t, tt, labels, 1.0)
        guided = teacher.denoise(x_t, tt, labels, r.teacher.guidance)
        term = guided - cond
        norm = (x - guided).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        print(f"| {t} | {float(term.abs().mean()):.4f} | {float((term / norm).abs().mean()):.3f} "
              f"| {high_frequency_share(term):.3f} |")


if __name__ == "__main__":
    main()
