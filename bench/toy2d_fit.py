"""How well a one-step MLP fits the exact teacher's noise-to-sample map by regression alone (no
DM term, no critic): AdamW on a pairs folder made by `dmd make-pairs --teacher gmm`, the rate
falling linearly to zero, then `mode_metrics` of 10,000 outputs from fresh noise (seed 123)
against the mixture (BENCHMARKS.md, "Beyond the ring").

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/toy2d_fit.py PAIRS STEPS LR WIDTH LAYERS ACTIVATION [KEY=VALUE ...]
  e.g. bench/toy2d_fit.py pairs/toy2d-tight 1500 3e-3 256 3 relu teacher.gmm.components=5
       teacher.gmm.radius=6.0 teacher.gmm.std=0.2
"""

import sys
import time

import torch
from torch import nn

from dmdcli.pairs import PairSet
from dmdcli.recipe import load_recipe
from dmdcli.teachers.gmm import GMMTeacher


def main():
    pairs, steps, lr, width, layers, activation, *over = sys.argv[1:]
    steps, lr, width, layers = int(steps), float(lr), int(width), int(layers)
    torch.manual_seed(0)
    teacher = GMMTeacher(load_recipe("recipes/toy2d.toml", over).teacher.gmm)
    pair_set = PairSet(pairs, teacher)   # refuses pairs of another mixture
    rows = pair_set.rows(torch.arange(len(pair_set)))
    z, y, mixture = rows["noise"], rows["output"], teacher.mixture
    act = {"silu": nn.SiLU, "relu": nn.ReLU}[activation]
    sizes = [mixture.dim] + [width] * layers
    net = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), act())],
                        nn.Linear(width, mixture.dim))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    t0 = time.time()
    for _ in range(steps):
        i = torch.randint(0, len(z), (512,))
        loss = ((net(z[i]) - y[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        m = mixture.mode_metrics(net(torch.randn(10000, mixture.dim, generator=torch.Generator().manual_seed(123))))
        targets = mixture.mode_metrics(y[:10000])
    spread, exact = m["mode_spread_ratio"], targets["mode_spread_ratio"]
    print(f"{sys.argv[2:7]}: last batch MSE {loss.item():.4f}  spread {min(spread):.2f}..{max(spread):.2f} "
          f"(the pairs' own {min(exact):.2f}..{max(exact):.2f})  far {m['far_share']:.3f}  {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
