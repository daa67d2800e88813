"""An exact teacher: a Gaussian mixture whose denoiser is closed form, under VP or flow noise.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = a x0 + b eps (VP: a = sqrt(alpha_bar_t),
b = sqrt(1 - alpha_bar_t); rectified flow: a = 1 - sigma_t, b = sigma_t),
x_t | k ~ N(a mu_k, (a^2 s_k^2 + b^2) I), so Tweedie's formula
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
from ..schedules import FlowSchedule, VPSchedule
from .base import Teacher

# The scheduler the exact teacher is defined under: Stable Diffusion's (scaled_linear,
# alpha_bar_999 about 0.0047), so the toy sees the same noise levels as SD.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": True,
    "timestep_spacing": "trailing", "steps_offset": 0,
}
# Under teacher.gmm.schedule = "flow": SD3's scheduler (its shift from teacher.gmm.shift).
FLOW_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


# A mode's region in mode_metrics: at most this many of its stds from its centre (exact 2-D
# samples fall outside it 0.03% of the time), and at most half the way to the nearest other centre.
MODE_RADIUS_STDS = 4.0


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

    def mode_metrics(self, x: torch.Tensor, radius_in_stds: float = 3.0, reference: torch.Tensor | None = None,
                     seed: int = 0) -> dict:
        """Mode coverage and shape of samples x against exact samples (`reference`, else drawn
        here from `seed`, as many as x and at least 10,000):
        - precision: share of samples within 3 std of some mode centre;
        - mode_mass_ratio: share of samples nearest each centre over that centre's weight;
        - mode_spread_ratio: per mode, the RMS per-dimension deviation from its centre of the
          samples that lie within the mode's radius (half the distance to the nearest other
          centre, at most MODE_RADIUS_STDS of its stds), over the same for the exact samples, so
          the truncation cancels: 1 for the mixture, above 1 for modes too wide, below for modes
          too tight or collapsed;
        - far_share: share of samples outside every mode's radius (bridges between modes, a
          uniform ring), beside the exact samples' own (far_share_exact). The cap keeps bridges
          out of the spread where modes lie far apart (radius 6, std 0.2: centres 35 stds apart):
          without it, the 3-layer toy2d recipe's student there, 4.4% of its samples strung
          between modes, read 1.7 to 1.9 times too wide and 0.0% between modes;
        - mode_energy: the largest over modes of the energy distance (2 E|x - y| - E|x - x'|
          - E|y - y'|, unbiased) between the samples and the exact samples nearest that mode (at
          most 2,000 of each), in units of the mode's std: about 0 only when every mode has the
          mixture's shape; per mode, so that the noise in how many samples land in each mode
          (mode_mass_ratio's business) does not swamp it for far-apart modes.
        Neighbouring centres of the default ring lie 2.30 apart, under the 3-std radius of
        precision, so precision and mass alone pass a ring without modes; these do not."""
        x = x.double()
        d = torch.cdist(x, self.means)
        precision = (d <= radius_in_stds * self.stds[None]).any(dim=1).double().mean().item()
        near_x = d.argmin(dim=1)
        counts = torch.bincount(near_x, minlength=len(self.weights)).double()
        mass = (counts / len(x) / self.weights).tolist()
        if reference is None:
            reference, _ = self.sample(max(len(x), 10000), torch.Generator().manual_seed(seed))
        reference = reference.double()
        spread_x, far_x = self._mode_spread(x)
        spread_ref, far_ref = self._mode_spread(reference)
        near_ref = torch.cdist(reference, self.means).argmin(dim=1)
        energy = max((energy_distance(x[near_x == k][:2000], reference[near_ref == k][:2000]) / float(self.stds[k])
                      if (near_x == k).sum() > 1 else float("inf")) for k in range(len(self.means)))
        return {"precision": precision, "mode_mass_ratio": mass,
                "mode_spread_ratio": (spread_x / spread_ref).tolist(), "far_share": far_x,
                "far_share_exact": far_ref, "mode_energy": energy}

    def _mode_spread(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(per-mode RMS per-dimension deviation inside the mode's radius (nan for a mode no
        sample reaches), share of samples outside every mode's radius)."""
        gaps = torch.cdist(self.means, self.means) + torch.diag(torch.full((len(self.means),), float("inf"),
                                                                           dtype=torch.float64))
        radius = torch.minimum(gaps.min(dim=1).values / 2, MODE_RADIUS_STDS * self.stds)
        d = torch.cdist(x, self.means)
        nearest = d.argmin(dim=1)
        inside = d[torch.arange(len(x)), nearest] <= radius[nearest]
        spread = torch.full((len(self.means),), float("nan"), dtype=torch.float64)
        for k in range(len(self.means)):
            mine = inside & (nearest == k)
            if mine.any():
                spread[k] = ((x[mine] - self.means[k]) ** 2).sum(1).mean().div(self.dim).sqrt()
        return spread, (~inside).double().mean().item()


def energy_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    """Szekely's energy distance 2 E|x - y| - E|x - x'| - E|y - y'| with unbiased within-set
    means (pairs of distinct samples), by blocks of `chunk` rows."""
    def mean_distance(a, b, same):
        total = sum(torch.cdist(a[i:i + chunk], b).sum() for i in range(0, len(a), chunk))
        return total / (len(a) * (len(b) - 1) if same else len(a) * len(b))

    x, y = x.double(), y.double()
    return float(2 * mean_distance(x, y, False) - mean_distance(x, x, True) - mean_distance(y, y, True))


class GMMTeacher(Teacher):
    name = "gmm"

    def __init__(self, cfg):
        self.cfg = cfg
        self.mixture = Mixture.from_config(cfg)
        if cfg.schedule == "flow":
            if cfg.shift <= 0:
                raise UserError(f"teacher.gmm.shift must be positive, got {cfg.shift}")
            self.scheduler_config = {**FLOW_SCHEDULER_CONFIG, "shift": cfg.shift}
            self.schedule = FlowSchedule(self.scheduler_config)
            self.default_sampler = "euler"
        else:
            self.scheduler_config = dict(SCHEDULER_CONFIG)
            self.schedule = VPSchedule.from_scheduler_config(self.scheduler_config)
            # Heun down to t = 0 (sampling.edm_vp_grid): DDIM's trailing grid ends at timestep
            # 1000 / steps - 1 and narrows modes tighter than its noise there (std 0.2: to 0.82).
            self.default_sampler = "heun"
        self.family = self.schedule.family
        self.sample_shape = (self.mixture.dim,)
        self.num_classes = len(self.mixture.weights) if cfg.conditional else None

    def denoise(self, x_t, t, cond, guidance: float = 1.0):
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return self._denoise(x_t, *self.schedule.coefficients(t, x_t[:, :1]), cond, guidance)

    def denoise_sigma(self, x_t, sigma, cond, guidance: float = 1.0):
        """Flow: x0 at a sigma off the training table (the Euler sampler's), as denoise at an index."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0], 1)
        return self._denoise(x_t, 1 - s, s, cond, guidance)

    def _denoise(self, x_t, a, b, cond, guidance):
        x = x_t.double()
        uncond = self.mixture.posterior_mean(x, a, b)
        if cond is None:
            return uncond.to(x_t.dtype)
        # The null class (index num_classes) means unconditional.
        is_null = cond >= len(self.mixture.weights)
        conditional = self.mixture.posterior_mean(x, a, b, cond.clamp(max=len(self.mixture.weights) - 1))
        conditional = torch.where(is_null[:, None], uncond, conditional)
        return classifier_free_guidance(uncond, conditional, guidance).to(x_t.dtype)

    def _mlp(self, prediction_type: str, activation: str = "silu", x_alone_init: bool = False) -> MLPDenoiser:
        return MLPDenoiser(self.mixture.dim, self.cfg.hidden, self.cfg.layers, self.num_classes,
                           prediction_type=prediction_type,
                           num_train_timesteps=self.schedule.num_train_timesteps, activation=activation,
                           x_alone_init=x_alone_init)

    def make_generator(self):
        # A freshly initialised MLP cannot start from the teacher: it predicts x directly. ReLU:
        # the teacher's noise-to-sample map is nearly constant within each mode's sector of the
        # noise and jumps between them, which a piecewise-linear MLP fits far sooner than a smooth
        # one (5 modes of std 0.2 at radius 6, 1,500 steps of regression on the teacher's pairs:
        # SiLU's modes 2.1..2.2 times too wide, ReLU's 1.5..1.6; BENCHMARKS.md, "Beyond the ring").
        # x_alone_init: the noise's first-layer weights at full size, not shrunk 4.1 times by the
        # time embedding's share of the fan-in (the recipe on that mixture, bridges between modes
        # counted as width: 2.03..2.19 times too wide with them shrunk, 1.73..1.90 at full size).
        return self._mlp("sample", "relu", x_alone_init=True)

    def make_critic(self):
        # The fake score in the parametrisation a teacher of this family is trained in.
        return self._mlp("flow" if self.family == "flow" else "epsilon")

    def describe(self) -> dict:
        # The mixture and its schedule define the teacher; the MLP sizes do not.
        mixture = {k: v for k, v in asdict(self.cfg).items() if k not in ("hidden", "layers")}
        if self.family != "flow":   # the VP teacher's identity as before the flow schedule existed
            mixture = {k: v for k, v in mixture.items() if k not in ("schedule", "shift")}
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
