"""The toy2d student's mode shape under one recipe change: distils recipes/toy2d.toml with the
given overrides into runs/toyexp/NAME, then prints `mode_metrics` of 10,000 one-step samples
(noise seed 123) against the exact mixture (BENCHMARKS.md, the toy2d shape table).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/toy2d_shape.py NAME [--critic v_prediction] [KEY=VALUE ...]
  e.g. bench/toy2d_shape.py ema train.ema_decay=0.995
"""

import sys
import time

import torch

from dmdcli.recipe import load_recipe
from dmdcli.runner import distill
from dmdcli.runs import load_student
from dmdcli.sampling import student_sample
from dmdcli.teachers import gmm


def main():
    name, *over = sys.argv[1:]
    if over[:1] == ["--critic"]:   # the critic's output parametrisation (the recipe has no key for it)
        prediction = over[1]
        gmm.GMMTeacher.make_critic = lambda self: self._mlp(prediction)
        over = over[2:]
    t0 = time.time()
    r = load_recipe("recipes/toy2d.toml", [f"run.out='runs/toyexp/{name}'", "run.preview_samples=0",
                                           "run.log_with='none'", *over])
    distill(r)
    _, teacher, generator, _ = load_student(r.run.out)
    z = torch.randn(10000, teacher.mixture.dim, generator=torch.Generator().manual_seed(123))
    m = teacher.mixture.mode_metrics(student_sample(generator, teacher.schedule, z, None, [999]))
    print(f"{name} {over}: {summary(m)}  {time.time() - t0:.0f} s")


def summary(m: dict) -> str:
    """One line of `mode_metrics`' figures (also bench/toy2d_recipe_test.py's)."""
    spread, mass = m["mode_spread_ratio"], m["mode_mass_ratio"]
    return (f"precision {m['precision']:.3f}  spread {min(spread):.2f}..{max(spread):.2f}  "
            f"far {m['far_share']:.3f} (exact {m['far_share_exact']:.3f})  energy {m['mode_energy']:.3f}  "
            f"mass {min(mass):.2f}..{max(mass):.2f}")


if __name__ == "__main__":
    main()
