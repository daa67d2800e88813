"""The VP samplers on the exact 2-D mixture (BENCHMARKS.md, "The VP samplers"): each sampler's
error against its own 1,000-step solution (Heun: 500 steps) at 10, 20, 40 and 80 steps on the
default ring (256 noises, float64; a second-order sampler's error falls about 4 times a
doubling), then the per-mode spread of 10,000 samples at 50 steps on five modes of std 0.2 at
radius 6, where a last x0 taken at too high a noise narrows the modes.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/vp_samplers.py
"""

import torch

from dmdcli.recipe import GMMConfig
from dmdcli.sampling import SAMPLERS, teacher_ode
from dmdcli.teachers.gmm import GMMTeacher


def main():
    ring = GMMTeacher(GMMConfig())
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tight = GMMTeacher(GMMConfig(components=5, radius=6.0, std=0.2))
    z_tight = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    for sampler in SAMPLERS:
        reference = teacher_ode(ring, z, None, 500 if sampler == "heun" else 1000, 1.0, sampler).double()
        errors = [(teacher_ode(ring, z, None, n, 1.0, sampler).double() - reference).norm(dim=1).mean().item()
                  for n in (10, 20, 40, 80)]
        spread = tight.mixture.mode_metrics(teacher_ode(tight, z_tight, None, 50, 1.0, sampler))["mode_spread_ratio"]
        print(f"{sampler:9s} error at 10/20/40/80 steps {' '.join(f'{e:.4f}' for e in errors)}  "
              f"(falls {' '.join(f'{a / b:.2f}' for a, b in zip(errors, errors[1:]))} a doubling)  "
              f"tight modes at 50 steps: spread {min(spread):.2f}..{max(spread):.2f}")


if __name__ == "__main__":
    main()
