"""Has the critic learned the generator's distribution? The DM gradient is the critic's x0
minus the teacher's (DMD eq. 7): where the critic denoises the generator's samples no better
than the teacher does, the two nearly agree and the gradient has little to say, notably
about where the generator puts too much mass (its missing variety).

For one checkpoint of a run: N samples of its raw generator (what the critic trains on) and
N real test images, each noised at a grid of timesteps with the same noise; prints each
network's x0 error (mean squared, per pixel) and the DM signal, the mean |critic x0 - teacher
x0| relative to the teacher's own error. The teacher is unguided here, as the critic is.

Usage: .venv/bin/python bench/critic_fit.py RUN/checkpoints/step-N [--num 1000] [--dataset fashion-mnist]
"""

import argparse

import torch
from safetensors.torch import load_file

from dmdcli.datasets import load_images
from dmdcli.generate import generator_tensors
from dmdcli.networks import CriticWithHead, add_lora
from dmdcli.runs import load_student
from dmdcli.trainer import uses_gan

TIMESTEPS = (20, 100, 200, 400, 600, 800, 980)


def load_critic(ckpt, recipe, teacher):
    critic = teacher.make_critic()
    if recipe.train.lora_rank:
        add_lora(critic, recipe.train.lora_rank)
    if uses_gan(recipe):
        critic = CriticWithHead(critic)
    critic.load_state_dict(load_file(f"{ckpt}/critic.safetensors"))
    return critic.eval()


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--dataset", default="fashion-mnist")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    recipe, teacher, generator, step = load_student(a.checkpoint, device="cpu", ema=False)
    critic, gan = load_critic(a.checkpoint, recipe, teacher), uses_gan(recipe)
    made = generator_tensors(generator, teacher, recipe.student.timesteps, a.num, batch_size=500)
    images, labels, _ = load_images(a.dataset, "test", teacher.sample_shape[-1], limit=a.num)
    sets = {"generator": (made["x"], made.get("label")), "test images": (images, labels)}
    print(f"{a.checkpoint} (step {step}), {a.num} samples a set; x0 mean squared error per pixel")
    print("set          t     teacher  critic   critic/teacher  |critic-teacher| / |teacher-x|")
    for name, (x, y) in sets.items():
        for t in TIMESTEPS:
            mse_t, mse_c, signal = errors(x, y, teacher, critic, gan, t)
            print(f"{name:<12} {t:>3}   {mse_t:.4f}   {mse_c:.4f}   {mse_c / mse_t:>6.3f}          {signal:.3f}")


if __name__ == "__main__":
    main()
