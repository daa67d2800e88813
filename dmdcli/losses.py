"""The DMD math: pure functions over tensors, nothing else.

Equation numbers refer to "One-step Diffusion with Distribution Matching Distillation"
(DMD, Yin et al., CVPR 2024) and "Improved Distribution Matching Distillation for Fast
Image Synthesis" (DMD2, Yin et al., NeurIPS 2024). ../shared/SPEC.md sections 2-5 state
them as implemented here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A tiny constant in the per-sample normaliser so that an exact match (x == x0_real)
# cannot divide by zero (ours; the papers do not mention it).
NORMALISER_EPS = 1e-8


def dm_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", first: int | None = None, last: int | None = None) -> torch.Tensor:
    """Timesteps for the distribution-matching loss: integers uniform in [first, last],
    by default [0.02 T, 0.98 T], for T = 1000 20..980 inclusive (DMD section 3.2; DMD2 keeps it).
    """
    t_min = int(0.02 * num_train_timesteps) if first is None else first
    t_max = int(0.98 * num_train_timesteps) if last is None else last
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=device)


def critic_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Timesteps for the critic (fake score) loss: uniform over the whole range [0, T)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution-matching direction of DMD eq. 7-8, normalised per sample (DMD eq. 8's w).

    grad = (x0_fake - x0_real) / w, with w = mean over all non-batch dims of |x - x0_real|.
    Returns the gradient with non-finite entries replaced by 0, and how many were replaced (a
    tensor on x's device: reading it is a host sync, left to the caller's logging).
    """
    dims = tuple(range(1, x.ndim))
    w = (x - x0_real).abs().mean(dim=dims, keepdim=True) + NORMALISER_EPS
    grad = (x0_fake - x0_real) / w
    bad = ~torch.isfinite(grad)
    return torch.where(bad, torch.zeros_like(grad), grad), bad.sum()


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor,
                               x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD eq. 7 as a surrogate loss: 0.5 * mse(x, stopgrad(x - grad)).

    Its gradient with respect to x is grad / x.numel(): the KL gradient of eq. 7 up to a
    positive constant. x0_real and x0_fake must come from no_grad evaluations of the real
    (teacher, with guidance) and fake (critic, no guidance) scores at the same noisy x_t.
    Computed in float32 at least: the normaliser is a small difference of large numbers.
    """
    x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    grad, non_finite = dm_gradient(x32.detach(), x0_real.to(x32.dtype), x0_fake.to(x32.dtype))
    target = (x32 - grad).detach()
    return 0.5 * F.mse_loss(x32, target, reduction="mean"), non_finite


def critic_loss_vp(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fake-score denoising loss for VP teachers (DMD eq. 6): plain MSE on the teacher's own
    target (epsilon for epsilon teachers, the paper's case; v for v-prediction teachers, whose
    v-MSE read through epsilon would weight high noise by alpha_bar, almost nothing)."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def critic_loss_edm(x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                    sigma_data: float = 0.5) -> torch.Tensor:
    """Fake-score loss for EDM teachers: x0 MSE weighted by 1/sigma^2 + 1/sigma_data^2 (EDM eq. 8)."""
    weight = (sigma.float() ** -2 + sigma_data ** -2).view(-1, *([1] * (x0.ndim - 1)))
    return (weight * (x0_pred.float() - x0.float()) ** 2).mean()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                    huber_c: float | None = None) -> torch.Tensor:
    """DMD eq. 9's distance d(G(z), y) on (noise, teacher ODE output) pairs.

    kind: "mse", or "pseudo_huber": sqrt(|a-b|^2 + c^2) - c per sample with
    c = 0.00054 * sqrt(numel per sample) (the constant of Song & Dhariwal's iCT).
    LPIPS is not a pure tensor function (it needs a network); the trainer supplies it.
    """
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="mean")
    if kind == "pseudo_huber":
        per_sample = pred[0].numel()
        c = huber_c if huber_c is not None else 0.00054 * per_sample ** 0.5
        sq = ((pred - target) ** 2).flatten(1).sum(dim=1)
        return (torch.sqrt(sq + c * c) - c).mean()
    raise ValueError(f"unknown regression distance {kind!r}")


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """DMD2 eq. 4, generator side: softplus(-D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_critic_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """DMD2 eq. 4, discriminator side: softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard CFG: uncond + s * (cond - uncond); s = 1 is no guidance (SPEC section 2).

    Linear, so it applies equally to epsilon or x0 predictions of the same x_t.
    """
    return uncond + scale * (cond - uncond)
