"""Where should a one-step student read its noise? The untrained generator (the teacher's
network) at several conditioning timesteps, measured the way `dmd fid` measures, with a grid.

Usage: .venv/bin/python bench/student_init.py RECIPE [--timesteps 999,800,700,600,500]
           [--num 1000] [--ref fashion-mnist --features fashion] [--out runs/student-init]

The first row is always 999 with an x0 output head (`student.prediction_type = "sample"`);
the others read the output as the teacher does. VP teachers only (it reads alpha_bar).
BENCHMARKS.md has the Fashion-MNIST table ("as the teacher" is epsilon there).
"""

import argparse
from pathlib import Path

import torch

from dmdcli.evaluation.fid import fid_report
from dmdcli.evaluation.generate import generator_tensors
from dmdcli.evaluation.plots import image_grid
from dmdcli.recipe import load_recipe
from dmdcli.teachers import build_teacher, make_student


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--timesteps", default="999,800,700,600,500")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--ref", default="fashion-mnist")
    ap.add_argument("--features", default="fashion")
    ap.add_argument("--out", type=Path, default=Path("runs/student-init"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [(999, "sample")] + [(int(t), "teacher") for t in a.timesteps.split(",")]
    print("| noise fed in at | output read as | sqrt(alpha_bar) | FID | class accuracy | within-class spread |\n"
          "|---|---|---|---|---|---|")
    grid = []
    for t, pred in rows:
        r = load_recipe(a.recipe, [f"student.timesteps=[{t}]", f"student.prediction_type={pred}"])
        teacher = build_teacher(r.teacher)
        torch.manual_seed(r.run.seed)   # as distill initialises its networks
        generator = make_student(teacher, r).eval()
        samples = generator_tensors(generator, teacher, [t], a.num, r.run.seed, batch_size=250,
                                    precision=r.train.mixed_precision)
        rep = fid_report(samples, a.ref, a.features, batch_size=250)
        num = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
        print(f"| {t} | {'x0' if pred == 'sample' else 'as the teacher'} | "
              f"{float(teacher.schedule.alphas_cumprod[t]) ** 0.5:.4f} | {rep['fid']:.1f} | "
              f"{num(rep.get('class_accuracy'))} | {num(rep.get('within_class_spread'))} |", flush=True)
        grid.append(teacher.to_images(samples["x"][:20]))
    image_grid(torch.cat(grid), a.out / "student-init.png", nrow=20)
    print(f"grid: {a.out / 'student-init.png'} (one row per line of the table)")


if __name__ == "__main__":
    main()
