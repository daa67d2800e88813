"""Noise schedules: VP (DDPM / Stable Diffusion), EDM (VE) and rectified flow (SD3), conversions
between predictions.

VP coefficients come from a diffusers scheduler's own `alphas_cumprod`, so any teacher's
scheduler config is honoured exactly; EDM sigmas from diffusers' EDM scheduler, flow sigmas
from its FlowMatchEulerDiscreteScheduler. Only the
conversions (SPEC section 1) are ours, done in float64 and cast back.
"""

from __future__ import annotations

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def _lookup(cache: dict, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t], with one copy of the table per device (not one per call)."""
    on_device = cache.get(t.device)
    if on_device is None:
        on_device = cache[t.device] = table.to(t.device)
    return on_device[t.long()]


class VPSchedule:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with integer t in [0, T)."""

    family = "vp"
    init_noise_sigma = 1.0   # the generator's input at its first timestep is z * this

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self._cache: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "VPSchedule":
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_config(config).alphas_cumprod)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return _lookup(self._cache, self.alphas_cumprod, t)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) in float64, shaped to broadcast against `like`."""
        a = _bcast(self._alpha_bar(t), like)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, n = self.coefficients(t, x0)
        return (s * x0.double() + n * eps.double()).to(x0.dtype)

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        if prediction_type == "sample":
            return pred
        s, n = self.coefficients(t, x_t)
        p, x = pred.double(), x_t.double()
        if prediction_type == "epsilon":
            out = (x - n * p) / s
        elif prediction_type == "v_prediction":
            out = s * x - n * p
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        return out.to(pred.dtype)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
        """What a network of this prediction type is trained to output at x_t = add_noise(x0, eps, t)."""
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            s, n = self.coefficients(t, x0)
            return (s * eps.double() - n * x0.double()).float()
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        if prediction_type == "epsilon":
            return pred
        s, n = self.coefficients(t, x_t)
        p, x = pred.double(), x_t.double()
        if prediction_type == "sample":
            out = (x - s * p) / n
        elif prediction_type == "v_prediction":
            out = n * x + s * p
        else:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        return out.to(pred.dtype)


class EDMSchedule:
    """x_t = x0 + sigma eps; 1000 Karras sigmas (sigma_min 0.002, sigma_max 80, rho 7),
    ascending by index as DMD2 indexes them (SPEC section 1)."""

    family = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 num_train_timesteps: int = 1000, sigma_data: float = 0.5):
        from diffusers import EDMEulerScheduler

        sched = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                  sigma_schedule="karras", num_train_timesteps=num_train_timesteps)
        sched.set_timesteps(num_train_timesteps)
        # diffusers orders sigmas descending with a trailing 0; DMD2 indexes them ascending.
        self.sigmas = sched.sigmas[:-1].double().flip(0).cpu()
        self.num_train_timesteps = num_train_timesteps
        self.sigma_data = sigma_data
        self.init_noise_sigma = float(self.sigmas[-1])   # EDM generators take z * 80 at sigma 80
        self._cache: dict[torch.device, torch.Tensor] = {}

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _lookup(self._cache, self.sigmas, t)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x0.double() + _bcast(self.sigma(t), x0) * eps.double()).to(x0.dtype)

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """EDM networks are preconditioned to return x0 (D(x; sigma)) directly."""
        if prediction_type != "sample":
            raise ValueError(f"EDM networks predict x0 ('sample'), not {prediction_type!r}")
        return pred


class FlowSchedule(VPSchedule):
    """Rectified flow (SD3, Flux): x_t = (1 - s_t) x0 + s_t eps, a linear path like VP's with
    other coefficients. The sigmas are diffusers' FlowMatchEulerDiscreteScheduler's training
    sigmas (its `shift` included), ascending by index, 1 at the top: a flow network reads the
    timestep s_t * 1000 and predicts the velocity v = eps - x0 (prediction type "flow"), so
    x0 = x_t - s_t v (issue 29)."""

    family = "flow"
    init_noise_sigma = 1.0

    def __init__(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.sigmas = sched.sigmas.double().flip(0).cpu()
        self.num_train_timesteps = len(self.sigmas)
        self._cache = {}

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _lookup(self._cache, self.sigmas, t)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - s_t, s_t) in float64, shaped to broadcast against `like`."""
        s = _bcast(self.sigma(t), like)
        return 1 - s, s

    @staticmethod
    def _check(prediction_type: str) -> None:
        if prediction_type == "v_prediction":   # VP's v (sqrt(a) eps - sqrt(1 - a) x0) has no flow meaning
            raise ValueError("flow networks predict 'flow' (eps - x0), 'sample' or 'epsilon', not 'v_prediction'")

    def to_x0(self, pred, x_t, t, prediction_type: str):
        self._check(prediction_type)
        if prediction_type != "flow":
            return super().to_x0(pred, x_t, t, prediction_type)
        _, s = self.coefficients(t, x_t)
        return (x_t.double() - s * pred.double()).to(pred.dtype)

    def training_target(self, x0, eps, t, prediction_type: str):
        self._check(prediction_type)
        if prediction_type != "flow":
            return super().training_target(x0, eps, t, prediction_type)
        return (eps.double() - x0.double()).float()
