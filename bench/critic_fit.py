"""Has the critic learned the generator's distribution? The DM gradient is the critic's x0
minus the teacher's (DMD eq. 7): where the critic denoises the generator's samples no better
than the teacher does, the two nearly agree and the gradient has little to say, notably
about where the generator puts too much mass (its missing variety).

For one checkpoint of a run: N samples of its raw generator (what the critic trains on) and
N real test images, each noised at a grid of timesteps with the same noise; prints each
network's x0 error (mean squared, per pixel) and the DM signal, the mean |critic x0 - teacher
x0| relative to the teacher's own error. The teacher is unguided here, as the critic is.

With --ema, the critic is the checkpoint's EMA of it (`train.critic_ema_decay`), which is
what such a run's DM loss reads. With --refit STEPS, the critic then trains alone on 4,000
samples of the frozen generator (seed 1; the measured ones are seed 0), with its VP loss at
batch 32 and --lr, and every 250 steps prints critic/teacher per timestep on the generator
set, for the critic and for an EMA of it (--refit-ema, per step): is what the critic misses
a lag behind the generator, or its optimiser's noise?

Usage: .venv/bin/python bench/critic_fit.py RUN/checkpoints/step-N [--ema] [--num 1000] [--dataset fashion-mnist]
           [--refit STEPS --lr 1e-4 --refit-ema 0.99]
"""

import argparse

import torch
from safetensors.torch import load_file

from dmdcli import losses
from dmdcli.datasets import load_images
from dmdcli.evaluation.generate import generator_tensors
from dmdcli.networks import CriticWithHead, add_lora
from dmdcli.runs import load_student
from dmdcli.trainer import uses_gan

TIMESTEPS = (20, 100, 200, 400, 600, 800, 980)


def load_critic(ckpt, recipe, teacher, ema: bool = False):
    """(critic, whether it returns GAN logits too): the trained one, or its EMA (no head)."""
    critic = teacher.make_critic()
    if recipe.train.lora_rank:
        add_lora(critic, recipe.train.lora_rank)
    head = uses_gan(recipe) and not ema
    if head:
        critic = CriticWithHead(critic)
    critic.load_state_dict(load_file(f"{ckpt}/{'critic_ema' if ema else 'critic'}.safetensors"))
    return critic.eval(), head


@torch.no_grad()
def errors(x, labels, teacher, critic, gan: bool, t: int, seed: int = 0):
    """(teacher's x0 MSE, critic's x0 MSE, mean |critic x0 - teacher x0| / mean |teacher x0 - x|)."""
    s = teacher.schedule
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + t))
    tt = torch.full((len(x),), t, dtype=torch.long)
    x_t = s.add_noise(x, eps, tt)
    cond = teacher.encode_condition(labels)
    real = teacher.denoise(x_t, tt, cond, 1.0)
    out = critic(x_t, tt, cond)
    fake = s.to_x0(out[0] if gan else out, x_t, tt, critic.prediction_type)
    return (((real - x) ** 2).mean().item(), ((fake - x) ** 2).mean().item(),
            ((fake - real).abs().mean() / (real - x).abs().mean()).item())


def refit(critic, gan, teacher, generator, recipe, x_eval, y_eval, steps: int, lr: float, decay: float):
    net = critic.critic if gan else critic
    ema = [p.detach().clone() for p in net.parameters()]
    made = generator_tensors(generator, teacher, recipe.student.timesteps, 4000, seed=1, batch_size=500,
                             precision=recipe.train.mixed_precision)
    x, y = made["x"], made.get("label")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    g, s = torch.Generator().manual_seed(1), teacher.schedule

    def ratios(tag):
        row = [errors(x_eval, y_eval, teacher, critic, gan, t) for t in TIMESTEPS]
        print(f"{tag:<24}" + "".join(f"{t:>5}:{c / r:.3f}" for t, (r, c, _) in zip(TIMESTEPS, row)), flush=True)

    ratios("refit step 0")
    for i in range(1, steps + 1):
        idx = torch.randint(0, len(x), (32,), generator=g)
        t = torch.randint(0, s.num_train_timesteps, (32,), generator=g)
        eps = torch.randn(x[idx].shape, generator=g)
        x_t = s.add_noise(x[idx], eps, t)
        with torch.enable_grad():
            loss = losses.critic_loss_vp(s.to_eps(net(x_t, t, y[idx] if y is not None else None), x_t, t,
                                                  net.prediction_type), eps)
            opt.zero_grad()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.train.grad_clip)
        opt.step()
        for e, p in zip(ema, net.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        if i % 250 == 0:
            ratios(f"refit step {i}")
            raw = [p.detach().clone() for p in net.parameters()]
            for e, p in zip(ema, net.parameters()):
                p.copy_(e)
            ratios(f"refit step {i}, EMA {decay}")
            for r, p in zip(raw, net.parameters()):
                p.copy_(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--ema", action="store_true", help="the critic's EMA (critic_ema.safetensors)")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--refit", type=int, default=0, help="then train the critic alone this many steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--refit-ema", type=float, default=0.99)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    recipe, teacher, generator, step = load_student(a.checkpoint, device="cpu", ema=False)
    critic, gan = load_critic(a.checkpoint, recipe, teacher, a.ema)
    made = generator_tensors(generator, teacher, recipe.student.timesteps, a.num, batch_size=500,
                                   precision=recipe.train.mixed_precision)
    images, labels, _ = load_images(a.dataset, "test", teacher.sample_shape[-1], limit=a.num)
    sets = {"generator": (made["x"], made.get("label")), "test images": (images, labels)}
    print(f"{a.checkpoint} (step {step}), critic{' EMA' if a.ema else ''}, {a.num} samples a set; "
          f"x0 mean squared error per pixel")
    print("set          t     teacher  critic   critic/teacher  |critic-teacher| / |teacher-x|")
    for name, (x, y) in sets.items():
        for t in TIMESTEPS:
            mse_t, mse_c, signal = errors(x, y, teacher, critic, gan, t)
            print(f"{name:<12} {t:>3}   {mse_t:.4f}   {mse_c:.4f}   {mse_c / mse_t:>6.3f}          {signal:.3f}")
    if a.refit:
        print(f"critic/teacher x0 error on the generator set while the critic trains alone at lr {a.lr}")
        refit(critic, gan, teacher, generator, recipe, *sets["generator"], a.refit, a.lr, a.refit_ema)


if __name__ == "__main__":
    main()
