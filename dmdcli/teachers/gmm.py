"""An exact teacher: a Gaussian mixture whose VP denoiser is closed form.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = a x0 + b eps (a = sqrt(alpha_bar_t),
b = sqrt(1 - alpha_bar_t)), x_t | k ~ N(a mu_k, (a^2 s_k^2 + b^2) I), so Tweedie's formula
gives E[x0 | x_t] = sum_k r_k(x_t) [mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x_t - a mu_k)],
with responsibilities r_k proportional to w_k N(x_t; a mu_k, (a^2 s_k^2 + b^2) I).
Class-conditional: class k is component k, and guidance mixes the conditional and
unconditional predictions in the standard CFG form.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..utils.errors import UserError
from ..losses import classifier_free_guidance
from ..networks import MLPDenoiser
from ..schedules import VPSchedule
from .base import Teacher

# The scheduler the exact teacher is defined under: Stable Diffusion's (scaled_linear,
# alpha_bar_999 about 0.0047), so the toy sees the same noise levels as SD.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": True,
    "timestep_spacing": "trailing", "steps_offset": 0,
}


class Mixture:
    """Isotropic Gaussian mixture: means (K, D), stds (K,), weights (K,) summing to 1."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        self.means = means.double()
        self.stds = stds.double()
        self.weights = (weights / weights.sum()).double()

    @classmethod
    def from_config(cls, cfg) -> "Mixture":
        if cfg.means:
            try:
                means = torch.tensor(cfg.means, dtype=torch.float64)
            except ValueError:
                means = torch.zeros(0)
            k = means.shape[0]
            if means.ndim != 2:
                raise UserError("teacher.gmm.means must be a list of equal-length lists of numbers")
            stds = torch.tensor(cfg.stds or [cfg.std] * k, dtype=torch.float64)
        else:
            if cfg.dim < 2:
                raise UserError("teacher.gmm.dim must be at least 2 for a ring; give 'means' for 1-D mixtures")
            k = cfg.components
            if k < 1:
                raise UserError(f"teacher.gmm.components must be at least 1, got {k}")
            angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
            means = torch.zeros(k, cfg.dim, dtype=torch.float64)
            means[:, 0], means[:, 1] = cfg.radius * angle.cos(), cfg.radius * angle.sin()
            stds = torch.full((k,), cfg.std, dtype=torch.float64)
        weights = torch.tensor(cfg.weights, dtype=torch.float64) if cfg.weights else torch.ones(k, dtype=torch.float64)
        if len(stds) != k or len(weights) != k:
            raise UserError(f"teacher.gmm: means, stds and weights must have the same length ({k} components)")
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise UserError("teacher.gmm: stds must be positive and weights non-negative with a positive sum")
        return cls(means, stds, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
        """Exact samples and their component labels."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * eps, labels

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] (float64). a, b: (B, 1); labels restrict to one component each."""
        mu, s2 = self.means.to(x_t.device), (self.stds ** 2).to(x_t.device)
        var = a * a * s2[None, :] + b * b                                 # (B, K)
        diff = x_t[:, None, :] - a[:, :, None] * mu[None]                  # (B, K, D)
        post = mu[None] + (a * s2[None, :] / var)[:, :, None] * diff       # (B, K, D)
        if labels is not None:
            return post[torch.arange(len(labels), device=x_t.device), labels]
        log_r = (self.weights.to(x_t.device).log()[None] - 0.5 * self.dim * var.log()
                 - 0.5 * (diff ** 2).sum(-1) / var)
        r = torch.softmax(log_r, dim=1)
        return (r[:, :, None] * post).sum(1)

    def mode_metrics(self, x: torch.Tensor, radius_in_stds: float = 3.0) -> dict:
        """Precision: share of samples within 3 std of some mode centre.
        Mass: share of samples nearest each centre, divided by that centre's weight."""
        x = x.double()
        d = torch.cdist(x, self.means)
        precision = (d <= radius_in_stds * self.stds[None]).any(dim=1).double().mean().item()
        counts = torch.bincount(d.argmin(dim=1), minlength=len(self.weights)).double()
        mass = (counts / len(x) / self.weights).tolist()
        return {"precision": precision, "mode_mass_ratio": mass}


class GMMTeacher(Teacher):
    name = "gmm"
    family = "vp"

    def __init__(self, cfg):
        self.cfg = cfg
        self.mixture = Mixture.from_config(cfg)
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.schedule = VPSchedule.from_scheduler_config(self.scheduler_config)
        self.sample_shape = (self.mixture.dim,)
        self.num_classes = len(self.mixture.weights) if cfg.conditional else None

    def denoise(self, x_t, t, cond, guidance: float = 1.0):
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        a, b = self.schedule.coefficients(t, x_t[:, :1])
        x = x_t.double()
        uncond = self.mixture.posterior_mean(x, a, b)
        if cond is None:
            return uncond.to(x_t.dtype)
        # The null class (index num_classes) means unconditional.
        is_null = cond >= len(self.mixture.weights)
        conditional = self.mixture.posterior_mean(x, a, b, cond.clamp(max=len(self.mixture.weights) - 1))
        conditional = torch.where(is_null[:, None], uncond, conditional)
        return classifier_free_guidance(uncond, conditional, guidance).to(x_t.dtype)

    def _mlp(self, prediction_type: str) -> MLPDenoiser:
        return MLPDenoiser(self.mixture.dim, self.cfg.hidden, self.cfg.layers, self.num_classes,
                           prediction_type=prediction_type,
                           num_train_timesteps=self.schedule.num_train_timesteps)

    def make_generator(self):
        # A freshly initialised MLP cannot start from the teacher: it predicts x directly.
        return self._mlp("sample")

    def make_critic(self):
        return self._mlp("epsilon")

    def describe(self) -> dict:
        # The mixture and its schedule define the teacher; the MLP sizes do not.
        mixture = {k: v for k, v in asdict(self.cfg).items() if k not in ("hidden", "layers")}
        return {"name": self.name, "gmm": mixture, "scheduler": self.scheduler_config}

    def save_preview(self, student, teacher, labels, path: Path, title: str = "") -> None:
        from ..evaluation.plots import scatter_panels

        g = torch.Generator().manual_seed(0)
        truth, _ = self.mixture.sample(len(student), g, labels.cpu() if labels is not None else None)
        panels = [("data (exact)", truth)]
        if teacher is not None:
            panels.append(("teacher ODE", teacher))
        panels.append(("student", student))
        scatter_panels(panels, self.mixture.means, path, title)
