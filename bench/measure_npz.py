"""Measure sample sets made elsewhere (e.g. on a GPU machine by `dmd sample --images npz`)
the way `dmd compare` measures its rows: FID, class accuracy and within-class spread against
the shipped Fashion-MNIST statistics with the shipped classifier, one row per file, and a grid
of each student over the reference teacher's samples for the same noise and classes.

Usage: .venv/bin/python bench/measure_npz.py [--teacher T.npz] STUDENT.npz [...] [--out DIR] [--real N]

--real N adds a row for the first N images of Fashion-MNIST's training split, in the padded
32x32 frame the teacher makes: the figures real images reach against the test split's.
"""

import argparse
import json
from pathlib import Path

import torch

from dmdcli.datasets import load_images
from dmdcli.evaluation.samples import load_samples, sample_tensors
from dmdcli.evaluation.fid import fid_report
from dmdcli.evaluation.plots import class_grid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path, help=".npz sample sets to measure")
    ap.add_argument("--teacher", type=Path, help="the teacher's .npz (measured, and the grids' lower half)")
    ap.add_argument("--out", type=Path, default=Path("runs/measure-npz"))
    ap.add_argument("--real", type=int, default=0, help="also measure the first N training images (0: no)")
    a = ap.parse_args()
    if a.real < 0 or not (a.teacher or a.files or a.real):
        ap.error("give .npz files, --teacher, or --real N with N > 0")
    a.out.mkdir(parents=True, exist_ok=True)
    as_x = lambda t: t["image"][:100, :1].float() / 127.5 - 1   # noqa: E731
    num = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    teacher = load_samples(a.teacher)[0] if a.teacher else None
    rows = []

    def measure(file: str, name: str, tensors: dict) -> None:   # a row printed, and kept for the json
        r = fid_report(tensors, "fashion-mnist", "fashion", batch_size=500)
        rows.append({"file": file, **r})
        print(f"| {name} | {r['fid']:.1f} | {num(r.get('class_accuracy'))} | {num(r['within_class_spread'])} | "
              f"{r['num_samples']} |")

    print("| samples | FID | class accuracy | within-class spread | samples measured |\n|---|---|---|---|---|")
    if teacher is not None:
        measure(str(a.teacher), a.teacher.name, teacher)
    for path in a.files:
        tensors = load_samples(path)[0]
        measure(str(path), path.name, tensors)
        if teacher is not None:
            class_grid(as_x(tensors), as_x(teacher), 10, lambda x: x, a.out / f"{path.stem}-grid.png")
    if a.real:
        x, labels, _ = load_images("fashion-mnist", "train", 32, limit=a.real)
        measure(f"fashion-mnist train[:{a.real}]", f"training images, first {a.real}", sample_tensors(x, labels))
    (a.out / "measured.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
