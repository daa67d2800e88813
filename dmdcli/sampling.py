"""Samplers as small functions over tensors: the teacher's deterministic ODE (on diffusers'
schedulers, fed x0 predictions) and the student's one- or few-step generation."""

from __future__ import annotations

import torch

from .errors import UserError

SAMPLERS = {"ddim": "DDIMScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
            "heun": "HeunDiscreteScheduler"}  # Heun: 2 network calls a step (EDM's sampler)


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for `sampler`, configured to take x0 predictions, deterministic."""
    import diffusers

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    cfg = {**scheduler_config, "prediction_type": "sample", "timestep_spacing": "trailing"}
    if sampler == "ddim":
        cfg["set_alpha_to_one"] = True  # the last step returns the x0 prediction
    if sampler == "dpmpp-2m":
        cfg.update(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(cfg)


@torch.no_grad()
def teacher_ode(teacher, noise: torch.Tensor, cond, steps: int, guidance: float = 1.0,
                sampler: str = "ddim") -> torch.Tensor:
    """Integrate the teacher's probability-flow ODE from pure noise (VP teachers)."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    sched = make_scheduler(sampler, teacher.scheduler_config)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        x0 = teacher.denoise(x_in, t.expand(len(x)).long(), cond, guidance)
        x = sched.step(x0, t, x).prev_sample
    return x


def generator_x0(generator, schedule, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The generator's x0 at conditioning timestep t (it may predict sample, eps or v)."""
    net = getattr(generator, "module", generator)
    return schedule.to_x0(generator(x_t, t, cond), x_t, t, net.prediction_type)


@torch.no_grad()
def student_sample(generator, schedule, noise: torch.Tensor, cond, timesteps: list[int],
                   rng: torch.Generator | None = None, renoise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One step (timesteps = [999]) or DMD2's few-step sampling: x0 -> re-noise to the next t
    (with renoise[i] when given, else noise drawn from rng)."""
    x = noise
    for i, t in enumerate(timesteps):
        tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        x0 = generator_x0(generator, schedule, x, tt, cond)
        if i + 1 < len(timesteps):
            eps = (renoise[i].to(x.device, x.dtype) if renoise is not None
                   else torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype))
            x = schedule.add_noise(x0, eps, torch.full_like(tt, timesteps[i + 1]))
        else:
            x = x0
    return x
