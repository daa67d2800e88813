"""Pixel grain of sample files: each image's energy above a 3x3 box blur (per pixel, images in
[-1, 1]), as mean and median over the images, and the mean total variation.

Usage: .venv/bin/python bench/grain.py SAMPLES.npz [SAMPLES.npz ...] [--num 2000]
(.npz files as `dmd sample --images npz` writes them; the first --num images of each)
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """x minus its 3x3 box blur (edges averaged over the pixels inside)."""
    return x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--num", type=int, default=2000)
    a = ap.parse_args()
    print("| file | images | high-frequency energy, mean | median | total variation |\n|---|---|---|---|---|")
    for path in a.files:
        with np.load(path) as f:
            x = torch.from_numpy(f["arr_0"][: a.num]).float().permute(0, 3, 1, 2) / 127.5 - 1
        energy = (high_frequency(x) ** 2).mean(dim=(1, 2, 3))
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()
        print(f"| {path} | {len(x)} | {energy.mean():.4f} | {energy.median():.4f} | {tv:.4f} |")


if __name__ == "__main__":
    main()
