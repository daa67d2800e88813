"""What `distill` spends outside its networks, measured inside the same iterations (issue 5's
target: at most 10% of the network passes; issue 25, item 5).

Usage: .venv/bin/python bench/distill_overhead.py [--batch 32] [--iters 3] [--rounds 12]

Every network call of a real iteration is timed where it happens: the generator's forward, the
critic's (with its GAN head, also the bottleneck-only `logits` pass), the teacher's real score
(`teacher.denoise`), and every backward pass (`accelerator.backward`); the optimiser steps are timed apart. The rest
of the iteration's wall time (noise and timestep draws, real-data batches, losses, gradient
clipping, EMA, logging, host syncs) is our overhead. Nothing is compared across calls, so the
machine's drift between rounds cannot show up as overhead; the spread across rounds is
reported beside the median.

The set-up is recipes/fashion.toml (the shipped EDM teacher, DMD2 with the GAN head on real
Fashion-MNIST images) with one critic step per generator step, so that every iteration holds
every pass.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Clock:
    """Time spent inside the wrapped calls, per category; nested calls count once."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.depth, self.t0 = 0, 0.0

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            if self.depth == 0:
                self.sync()
                self.t0 = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.sync()
                    self.spent[category] += time.perf_counter() - self.t0
        return timed

    def reset(self):
        self.spent = dict.fromkeys(self.spent, 0.0)


def instrument(trainer) -> Clock:
    clock = Clock(trainer.acc.device)
    gen, critic = trainer.acc.unwrap_model(trainer.generator), trainer.acc.unwrap_model(trainer.critic)
    for module in (gen, critic, getattr(critic, "critic", critic), trainer.teacher.real):
        module.forward = clock.wrap("forward", module.forward)
    if hasattr(critic, "logits"):
        critic.logits = clock.wrap("forward", critic.logits)
    # The real score reaches its network through the teacher's own methods (EDM: denoise_sigma,
    # not forward); timed there, preconditioning and guidance included.
    trainer.teacher.denoise = clock.wrap("forward", trainer.teacher.denoise)
    trainer.acc.backward = clock.wrap("backward", trainer.acc.backward)
    for opt in (trainer.opt_g, trainer.opt_c):
        opt.step = clock.wrap("optimizer", opt.step)
    return clock


def spread(values) -> str:
    return f"median {statistics.median(values):7.1f}   range {min(values):7.1f} .. {max(values):7.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="iterations per round")
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args()
    from dmdcli.recipe import load_recipe
    from dmdcli.trainer import DMDTrainer

    root = Path(__file__).resolve().parents[1]
    out = Path(tempfile.mkdtemp()) / "run"
    r = load_recipe(root / "recipes" / "fashion.toml",
                    [f"run.out='{out}'", f"train.batch_size={a.batch}", "train.critic_steps_per_generator_step=1",
                     "run.log_with='none'", "run.preview_samples=0", "train.warmup_steps=0"])
    trainer = DMDTrainer(r)
    clock = instrument(trainer)
    trainer.train_step()   # warm-up: allocator, first-call costs
    rows = []
    for _ in range(a.rounds):
        clock.reset()
        clock.sync()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            trainer.train_step()
        clock.sync()
        wall = (time.perf_counter() - t0) / a.iters
        fwd, bwd, opt = (clock.spent[k] / a.iters for k in ("forward", "backward", "optimizer"))
        rows.append({"wall": 1e3 * wall, "network": 1e3 * (fwd + bwd), "optimizer": 1e3 * opt,
                     "rest": 1e3 * (wall - fwd - bwd - opt)})
    print(f"batch {a.batch}, {a.rounds} rounds x {a.iters} iterations, torch threads {torch.get_num_threads()}, "
          f"device {trainer.acc.device}")
    for key, label in (("wall", "iteration"), ("network", "network passes (forward + backward)"),
                       ("optimizer", "optimiser steps"), ("rest", "everything else")):
        print(f"  {label:38s} ms  {spread([row[key] for row in rows])}")
    rest = [100 * row["rest"] / row["network"] for row in rows]
    both = [100 * (row["rest"] + row["optimizer"]) / row["network"] for row in rows]
    print(f"  {'everything else / network':38s} %   {spread(rest)}")
    print(f"  {'with the optimiser / network':38s} %   {spread(both)}")


if __name__ == "__main__":
    main()
