"""Samplers as small functions over tensors: the teacher's deterministic ODE (on diffusers'
schedulers, fed x0 predictions or, for flow teachers, velocities) and the student's one- or
few-step generation."""

from __future__ import annotations

import torch

from .utils.errors import UserError

# DDIM (eta 0) fed x0 predictions is Euler's step on the same ODE in the form x / alpha,
# sigma / alpha, so it runs on diffusers' Euler scheduler: diffusers' DDIMScheduler steps to
# t - T // steps, off its own trailing grid when steps do not divide T (0.07 from the DDIM update
# at 30 steps on the 2-D mixture, 0.65 at 80), and takes no timestep list.
EDM_GRID_SAMPLERS = ("euler", "heun")   # on a VP schedule: T - 1 down to 0 (edm_vp_grid)
SAMPLERS = {"ddim": "EulerDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
            "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}  # Heun: 2 calls a step


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for `sampler`, configured to take x0 predictions, deterministic."""
    import diffusers

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    cfg = {**scheduler_config, "prediction_type": "sample", "timestep_spacing": "trailing"}
    if sampler == "dpmpp-2m":
        cfg.update(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    else:   # sigmas at the grid's timesteps: a teacher folder's own sigma spacing would refuse or ignore them
        cfg.update(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                   interpolation_type="linear")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(cfg)


@torch.no_grad()
def teacher_ode(teacher, noise: torch.Tensor, cond, steps: int, guidance: float = 1.0,
                sampler: str = "ddim") -> torch.Tensor:
    """Integrate the teacher's probability-flow ODE from pure noise."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if teacher.family == "flow":
        return flow_ode(teacher, noise, cond, steps, guidance, sampler)
    if teacher.family == "edm":
        if sampler not in ("heun", "euler"):
            raise UserError(f"the {teacher.name} teacher samples with heun or euler (EDM's own samplers), "
                            f"not {sampler!r}")
        sigmas = karras_sigmas(steps, teacher.schedule).to(noise.device)
        return edm_ode(lambda x, s: teacher.denoise_sigma(x, s, cond, guidance), noise * sigmas[0], sigmas,
                       heun=sampler == "heun")
    sched = make_scheduler(sampler, teacher.scheduler_config)
    T = sched.config.num_train_timesteps
    if sampler in EDM_GRID_SAMPLERS:   # EDM's samplers, on EDM's kind of grid
        sched.set_timesteps(timesteps=edm_vp_grid(steps, T), device=noise.device)
    elif sampler == "ddim":   # diffusers' trailing grid, T - 1 down to T / steps - 1, as a list for Euler
        sched.set_timesteps(timesteps=[round(T - i * T / steps) - 1 for i in range(steps)], device=noise.device)
    else:   # DPM-Solver++: diffusers' trailing grid
        sched.set_timesteps(steps, device=noise.device)
    # Start at x_T = noise in the VP scale, the input the student reads at its top timestep. Not
    # sched.init_noise_sigma: with trailing spacing diffusers' Euler and Heun start at
    # noise * sigma_max, not noise * sqrt(sigma_max^2 + 1), a start 0.23% short on SD's schedule.
    x = noise / sched.scale_model_input(torch.ones_like(noise[:1]), sched.timesteps[0])
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        x0 = teacher.denoise(x_in, t.expand(len(x)).long(), cond, guidance)
        if i + 1 == len(sched.timesteps):
            return x0   # the last step lands on x0, returned as is
        x = sched.step(x0, t, x).prev_sample


def edm_vp_grid(steps: int, num_train_timesteps: int) -> list[int]:
    """Euler's and Heun's timesteps on a VP schedule: T - 1 down to 0, evenly (one step: T - 1
    alone). Ending at t = 0, the smallest noise the teacher was trained at, as EDM's sampler ends
    at sigma_min, Heun keeps its second order; on diffusers' trailing grid the last x0 is taken
    at timestep T / steps - 1 (19 at 50 steps), a posterior mean that narrows modes tighter than
    that noise (the 2-D mixture of std 0.2 to 0.82 of its width) and holds every sampler to
    first order (BENCHMARKS.md, "The VP samplers"). DDIM and DPM-Solver++ stay on the trailing
    grid: on this one DPM-Solver++ 2M was no better (its steps are uneven in log-SNR)."""
    if steps == 1:
        return [num_train_timesteps - 1]
    return [round((num_train_timesteps - 1) * (1 - i / (steps - 1))) for i in range(steps)]


def flow_ode(teacher, noise: torch.Tensor, cond, steps: int, guidance: float = 1.0,
             sampler: str = "euler") -> torch.Tensor:
    """A flow teacher's own sampler: diffusers' FlowMatchEulerDiscreteScheduler from its config
    (SD3's pipeline: its sigmas, shifted, from 1 down to 0), fed the velocity (x - x0) / sigma;
    the last step, into sigma 0, lands on x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if sampler != "euler":
        raise UserError(f"the {teacher.name} teacher's flow schedule samples with euler "
                        f"(FlowMatchEulerDiscreteScheduler), not {sampler!r}")
    sched = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    sched.set_timesteps(steps, device=noise.device)
    x = noise
    for t, sigma in zip(sched.timesteps, sched.sigmas):
        x0 = teacher.denoise_sigma(x, sigma, cond, guidance)
        x = sched.step((x - x0) / sigma, t, x).prev_sample.to(noise.dtype)
    return x


def karras_sigmas(steps: int, schedule) -> torch.Tensor:
    """`steps` Karras sigmas from the schedule's sigma_max down to its sigma_min, then 0 (from
    diffusers' EDM scheduler; EDM's own rho = 7)."""
    from diffusers import EDMEulerScheduler

    s = schedule.sigmas
    sched = EDMEulerScheduler(sigma_min=float(s[0]), sigma_max=float(s[-1]), sigma_schedule="karras")
    sched.set_timesteps(steps)
    return sched.sigmas.float()


def edm_ode(denoise, x: torch.Tensor, sigmas: torch.Tensor, heun: bool = True) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, algorithm 1 without churn):
    dx/dsigma = (x - D(x; sigma)) / sigma, Euler steps with Heun's correction except into
    sigma = 0 (2N - 1 network calls for N steps). x starts at noise * sigmas[0].
    diffusers has EDM's sigmas and an Euler scheduler, not this Heun variant."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if heun and s_next > 0:
            x_next = x + (s_next - s) * (d + (x_next - denoise(x_next, s_next)) / s_next) / 2
        x = x_next
    return x


def generator_x0(generator, schedule, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The generator's x0 at conditioning timestep t (it may predict sample, eps or v)."""
    net = getattr(generator, "module", generator)
    return schedule.to_x0(generator(x_t, t, cond), x_t, t, net.prediction_type)


@torch.no_grad()
def student_sample(generator, schedule, noise: torch.Tensor, cond, timesteps: list[int],
                   rng: torch.Generator | None = None, renoise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One step (timesteps = [999]) or DMD2's few-step sampling: x0 -> re-noise to the next t
    (with renoise[i] when given, else noise drawn from rng). noise is N(0, I); EDM students
    take it times sigma_max."""
    x = noise * schedule.init_noise_sigma
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
