"""The VP samplers, step by step against the textbook updates they stand for (issue 25, item 4).

`teacher_ode` drives diffusers' schedulers with x0 predictions; a mis-configured scheduler (a
DPM-Solver++ of order 1, Heun without its correction, a shifted time grid) still converges, so
a quality test at many steps cannot see it. Here every sampler must equal, to float precision,
an independent implementation of its update on the exact mixture's denoiser, at few steps,
where a first-order fall-back differs by far more than the tolerance.
"""

import math

import pytest
import torch

from dmdcli.recipe import GMMConfig
from dmdcli.sampling import edm_ode, teacher_ode
from dmdcli.teachers.gmm import GMMTeacher

STEPS = 5


def trailing(steps: int, T: int = 1000) -> list[int]:
    """diffusers' "trailing" spacing: T - 1, T - 1 - T/steps, ..., T/steps - 1."""
    return [round(T - 1 - i * T / steps) for i in range(steps)]


def down_to_zero(steps: int, T: int = 1000) -> list[int]:
    """Euler's and Heun's grid, EDM's kind: T - 1 down to 0 evenly, rounded."""
    return [round((T - 1) * (1 - i / (steps - 1))) for i in range(steps)]


def alpha_sigma(teacher, t: int) -> tuple[float, float]:
    a = float(teacher.schedule.alphas_cumprod[t])
    return math.sqrt(a), math.sqrt(1 - a)


def x0_at(teacher, x, t: int):
    return teacher.denoise(x, torch.tensor(t), None).double()


def ddim(teacher, z, steps=STEPS):
    """DDIM (eta 0): x_s = alpha_s x0 + sigma_s eps_hat; the last step returns x0."""
    ts, x = trailing(steps), z
    for i, t in enumerate(ts):
        a, s = alpha_sigma(teacher, t)
        x0 = x0_at(teacher, x, t)
        if i + 1 == len(ts):
            return x0
        a2, s2 = alpha_sigma(teacher, ts[i + 1])
        x = a2 * x0 + s2 * (x - a * x0) / s


def dpmpp_2m(teacher, z, steps=STEPS):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) in lambda = log(alpha / sigma); first
    order on the first step and on the last step into sigma = 0 (diffusers' lower_order_final)."""
    ts, x, prev = trailing(steps), z, None
    for i, t in enumerate(ts):
        x0 = x0_at(teacher, x, t)
        if i + 1 == len(ts):
            return x0
        a, s = alpha_sigma(teacher, t)
        a2, s2 = alpha_sigma(teacher, ts[i + 1])
        h = math.log(a2 / s2) - math.log(a / s)
        d = x0
        if prev is not None:
            r = prev[1] / h
            d = (1 + 1 / (2 * r)) * x0 - prev[0] / (2 * r)
        x = (s2 / s) * x - a2 * math.expm1(-h) * d
        prev = (x0, h)


def karras_ve(teacher, z, heun: bool, steps=STEPS):
    """Euler and Heun in the variance-exploding form x / alpha with sigma_ve = sigma / alpha:
    EDM's sampler (`edm_ode`, second order by tests/test_edm.py) on the VP grid down to t = 0."""
    ts = down_to_zero(steps)
    sig = [s / a for a, s in (alpha_sigma(teacher, t) for t in ts)] + [0.0]
    t_of = dict(zip(sig, ts))

    def denoise(x_ve, s):
        s = float(s)
        return x0_at(teacher, x_ve / math.sqrt(s * s + 1), t_of[s])

    return edm_ode(denoise, z * math.sqrt(sig[0] ** 2 + 1), torch.tensor(sig, dtype=torch.float64), heun=heun)


REFERENCES = {"ddim": ddim, "dpmpp-2m": dpmpp_2m, "euler": lambda t, z, n: karras_ve(t, z, False, n),
              "heun": lambda t, z, n: karras_ve(t, z, True, n)}


@pytest.fixture(scope="module")
def teacher_and_noise():
    teacher = GMMTeacher(GMMConfig(weights=[1, 2, 1, 1, 3, 1, 1, 2], std=0.3))
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher, z


@pytest.mark.parametrize("sampler", sorted(REFERENCES))
@pytest.mark.parametrize("steps", [STEPS, 7])
def test_vp_sampler_equals_its_textbook_update(teacher_and_noise, sampler, steps):
    """At 7 steps, which do not divide 1,000, diffusers' DDIMScheduler stepped to t - 1000 // 7,
    off its own grid (0.012 from the DDIM update; 0.07 at 30 steps): "ddim" runs on Euler's
    scheduler, the same update, given the grid."""
    teacher, z = teacher_and_noise
    ours = teacher_ode(teacher, z, None, steps=steps, sampler=sampler).double()
    reference = REFERENCES[sampler](teacher, z, steps)
    err = (ours - reference).abs().max().item()
    assert err < 2e-4, f"{sampler}: {err:.2e} from its textbook update"


def test_second_order_samplers_differ_from_first_order_ones(teacher_and_noise):
    """The tolerance above is far below the gap between orders at these steps, so a sampler that
    fell back to first order could not pass it."""
    teacher, z = teacher_and_noise
    gap_dpm = (dpmpp_2m(teacher, z) - ddim(teacher, z)).abs().max().item()
    gap_heun = (karras_ve(teacher, z, True) - karras_ve(teacher, z, False)).abs().max().item()
    assert min(gap_dpm, gap_heun) > 1e-2, (gap_dpm, gap_heun)


@pytest.mark.parametrize("sampler", sorted(REFERENCES))
@pytest.mark.parametrize("steps", [6, 7])
def test_last_step_lands_on_the_denoiser_output(teacher_and_noise, sampler, steps):
    """With steps not dividing 1000, diffusers' DDIM steps to t = 0, not to the clean image, and
    left 0.03 of noise in every sample; each sampler must end on its last x0 prediction."""
    teacher, z = teacher_and_noise
    outputs = []

    class Recording:
        family, scheduler_config = teacher.family, teacher.scheduler_config

        def denoise(self, *args):
            outputs.append(teacher.denoise(*args))
            return outputs[-1]

    x = teacher_ode(Recording(), z, None, steps=steps, sampler=sampler)
    assert torch.equal(x, outputs[-1])


def test_heun_on_the_vp_grid_is_second_order(teacher_and_noise):
    """Against its own 400-step solution, Heun's error falls about 4 times when its steps double
    (3.9, 3.6 measured here; 4.5, 4.0 on bench/vp_samplers.py's ring): its grid ends at t = 0 as
    EDM's ends at sigma_min. On diffusers' trailing grid the last x0 was taken at timestep 1000 / steps - 1 and the error only halved
    (1.8, 2.0), first order like DDIM's."""
    teacher, z = teacher_and_noise
    reference = teacher_ode(teacher, z, None, steps=400, sampler="heun").double()
    errors = [(teacher_ode(teacher, z, None, steps=n, sampler="heun").double() - reference).norm(dim=1).mean().item()
              for n in (10, 20, 40)]
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3, errors


def test_heun_keeps_the_width_of_modes_tighter_than_its_last_noise():
    """Five modes of std 0.2 (tests/test_gmm.py's tight mixture): Heun's 50 steps keep each mode's
    width (0.98..1.00 measured). Ending at timestep 19 (trailing), whose noise on this schedule is
    0.13, every sampler's last x0 narrowed the modes to 0.81..0.82, and the toy2d recipe's
    student, regressed on those pairs, to 0.79..0.85."""
    teacher = GMMTeacher(GMMConfig(components=5, radius=6.0, std=0.2))
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    spread = teacher.mixture.mode_metrics(teacher_ode(teacher, z, None, steps=50, sampler="heun"))["mode_spread_ratio"]
    assert all(0.95 < s < 1.05 for s in spread), spread


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_a_teacher_folders_own_sigma_spacing_does_not_move_the_grid(teacher_and_noise, sampler):
    """A saved scheduler config with Karras sigmas or log-linear interpolation (common in SDXL
    fine-tunes) made diffusers refuse the grid's timesteps, or ignore them for its sigmas."""
    teacher, z = teacher_and_noise

    class Configured:
        family, denoise = teacher.family, teacher.denoise
        scheduler_config = {**teacher.scheduler_config, "use_karras_sigmas": True, "interpolation_type": "log_linear"}

    torch.testing.assert_close(teacher_ode(Configured(), z, None, steps=STEPS, sampler=sampler),
                               teacher_ode(teacher, z, None, steps=STEPS, sampler=sampler))
