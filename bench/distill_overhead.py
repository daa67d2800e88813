"""Iteration time of `distill` against the sum of its network passes measured alone, in one
process, interleaved (issue 5's benchmark: our overhead must be at most 10% of that sum).

Usage: .venv/bin/python bench/distill_overhead.py [--batch 32] [--iters 5] [--rounds 3]

The teacher is the shipped Fashion-MNIST UNet (1.1M parameters, the real architecture), DMD2
with the GAN head, guidance 2, one critic step per generator step (so every iteration holds
every pass). Passes timed alone, at the sizes an iteration uses them:
  generator forward+backward (b); real score forward (2b: guidance); critic forward (b);
  critic + GAN head forward+backward (b, the generator's GAN loss); generator forward (b,
  no gradients, for the critic step); critic + GAN head forward+backward (2b: fake and real).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from dmdcli.recipe import load_recipe
    from dmdcli.trainer import DMDTrainer

    root = Path(__file__).resolve().parents[1]
    out = Path(tempfile.mkdtemp()) / "run"
    r = load_recipe(root / "recipes" / "fashion.toml",
                    [f"run.out='{out}'", f"train.batch_size={a.batch}", "train.critic_steps_per_generator_step=1",
                     "run.log_with='none'", "run.preview_samples=0", "train.warmup_steps=0"])
    trainer = DMDTrainer(r)
    t = trainer.teacher
    gen, critic = trainer.acc.unwrap_model(trainer.generator), trainer.acc.unwrap_model(trainer.critic)
    b = a.batch
    x = torch.randn(2 * b, *t.sample_shape)
    ts = torch.randint(0, 1000, (2 * b,))
    labels = torch.randint(0, t.num_classes, (2 * b,))

    def fwd_bwd(net, n):
        out = net(x[:n], ts[:n], labels[:n])
        loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        net.zero_grad(set_to_none=True)

    def fwd(net, n):
        with torch.no_grad():
            net(x[:n], ts[:n], labels[:n])

    passes = {
        "generator forward+backward (b)": lambda: fwd_bwd(gen, b),
        "real score forward (2b, guidance)": lambda: t.denoise(x[:b], ts[:b], labels[:b], r.teacher.guidance),
        "critic forward (b)": lambda: fwd(critic, b),
        "critic+head forward+backward (b)": lambda: fwd_bwd(critic, b),
        "generator forward (b)": lambda: fwd(gen, b),
        "critic+head forward+backward (2b)": lambda: fwd_bwd(critic, 2 * b),
    }
    trainer.train_step()   # warm-up: allocator, first-call costs
    for fn in passes.values():
        fn()
    iters, sums, alone = [], [], {k: [] for k in passes}
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for _ in range(a.iters):
            trainer.train_step()
        iters.append((time.perf_counter() - t0) / a.iters)
        total = 0.0
        for name, fn in passes.items():
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn()
            dt = (time.perf_counter() - t0) / a.iters
            alone[name].append(dt)
            total += dt
        sums.append(total)
    print(f"batch {b}, {a.iters} iterations x {a.rounds} rounds, torch threads {torch.get_num_threads()}")
    for name, v in alone.items():
        print(f"  {name:36s} {1000 * statistics.median(v):8.1f} ms")
    print(f"  {'sum of passes':36s} {1000 * statistics.median(sums):8.1f} ms  (per round: "
          f"{', '.join(f'{1000 * s:.0f}' for s in sums)})")
    print(f"  {'distill iteration':36s} {1000 * statistics.median(iters):8.1f} ms  (per round: "
          f"{', '.join(f'{1000 * s:.0f}' for s in iters)})")
    ratios = [i / s - 1 for i, s in zip(iters, sums)]
    print(f"  overhead per round: {', '.join(f'{100 * x:+.1f}%' for x in ratios)}; "
          f"median {100 * statistics.median(ratios):+.1f}%")


if __name__ == "__main__":
    main()
