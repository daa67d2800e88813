"""The exact teacher and its VP and flow schedules, against Monte Carlo and diffusers."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dmdcli.teachers.gmm import SCHEDULER_CONFIG, GMMTeacher, Mixture
from dmdcli.recipe import GMMConfig
from dmdcli.sampling import teacher_ode
from dmdcli.schedules import EDMSchedule, FlowSchedule, VPSchedule
from dmdcli.teachers import real_score


def mc_posterior_mean(mixture, x_t, a, b, n=2_000_000, seed=0, labels=None):
    """E[x0 | x_t] by self-normalised importance sampling from the prior."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = mixture.sample(n, g, labels)
    logw = -((x_t[None] - a * x0) ** 2).sum(1) / (2 * b * b)
    w = torch.softmax(logw, 0)
    return (w[:, None] * x0).sum(0)


@pytest.mark.parametrize("schedule", ["vp", "flow"])
@pytest.mark.parametrize("t", [50, 300, 600, 900])
def test_gmm_denoiser_matches_monte_carlo(t, schedule):
    cfg = GMMConfig(weights=[1, 2, 1, 1, 3, 1, 1, 2], std=0.4, schedule=schedule)  # unequal weights on purpose
    teacher = GMMTeacher(cfg)
    g = torch.Generator().manual_seed(t)
    tt = torch.full((3,), t)
    x0, _ = teacher.mixture.sample(3, g)
    x_t = teacher.schedule.add_noise(x0, torch.randn(3, 2, generator=g, dtype=torch.float64), tt)
    exact = teacher.denoise(x_t, tt, None)
    a, b = (c.item() for c in teacher.schedule.coefficients(torch.tensor([t]), x_t[:1]))
    for i in range(3):
        mc = mc_posterior_mean(teacher.mixture, x_t[i], a, b, seed=i)
        torch.testing.assert_close(exact[i], mc, atol=0.02, rtol=0)


def test_conditional_denoiser_and_guidance():
    teacher = GMMTeacher(GMMConfig(conditional=True))
    t = torch.full((4,), 700)
    x_t = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    a, b = (c.item() for c in teacher.schedule.coefficients(torch.tensor([700]), x_t[:1]))
    cond = teacher.denoise(x_t, t, labels, guidance=1.0)
    for i in range(2):
        mc = mc_posterior_mean(teacher.mixture, x_t[i], a, b, n=200_000, labels=torch.full((200_000,), i))
        torch.testing.assert_close(cond[i], mc, atol=0.02, rtol=0)
    uncond = teacher.denoise(x_t, t, None)
    null = teacher.denoise(x_t, t, torch.full((4,), 8))        # null class = unconditional
    torch.testing.assert_close(null, uncond)
    guided = teacher.denoise(x_t, t, labels, guidance=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))


def test_real_score_guides_only_inside_its_interval():
    teacher = GMMTeacher(GMMConfig(conditional=True))
    t = torch.tensor([100, 299, 300, 450, 600, 601, 900, 300])
    x_t = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    cond = teacher.denoise(x_t, t, labels, guidance=1.0)
    guided = teacher.denoise(x_t, t, labels, guidance=3.0)
    assert (guided - cond).abs().amax(dim=1).min() > 1e-3        # guidance changes every row
    mixed = real_score(teacher, x_t, t, labels, 3.0, (300, 600))
    inside = torch.tensor([False, False, True, True, True, False, False, True])
    torch.testing.assert_close(mixed[inside], guided[inside])
    torch.testing.assert_close(mixed[~inside], cond[~inside])
    torch.testing.assert_close(real_score(teacher, x_t, t, labels, 3.0), guided)          # default: everywhere
    torch.testing.assert_close(real_score(teacher, x_t, t, labels, 3.0, (950, 999)), cond)  # nowhere


def test_vp_schedule_matches_diffusers_add_noise_and_conversions():
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    vp = VPSchedule.from_scheduler_config(SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0, 20, 500, 980, 999])
    x_t = vp.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t))
    torch.testing.assert_close(vp.to_x0(eps, x_t, t, "epsilon"), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(vp.to_eps(x0, x_t, t, "sample"), eps, atol=1e-4, rtol=1e-4)
    v = vp.coefficients(t, x0)[0] * eps - vp.coefficients(t, x0)[1] * x0   # v = a eps - b x0
    torch.testing.assert_close(vp.to_x0(v.float(), x_t, t, "v_prediction"), x0, atol=1e-5, rtol=1e-5)
    # SD's schedule: alpha_bar at t = 999 is about 0.0047 (SPEC section 1).
    assert abs(vp.alphas_cumprod[999].item() - 0.0047) < 2e-4


def test_flow_schedule_matches_diffusers_scale_noise_and_conversions():
    """x_t = (1 - s) x0 + s eps as FlowMatchEulerDiscreteScheduler.scale_noise makes it, at the
    scheduler's own training sigmas (shifted); x0 back from the velocity, epsilon or x0."""
    config = {"num_train_timesteps": 1000, "shift": 3.0}
    sched, flow = FlowMatchEulerDiscreteScheduler.from_config(config), FlowSchedule(config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0, 20, 500, 980, 999])
    x_t = flow.add_noise(x0, eps, t)
    for i in range(5):   # diffusers' timesteps descend: our index t is its T - 1 - t
        theirs = sched.scale_noise(x0[i:i + 1], sched.timesteps[999 - t[i]].reshape(1), eps[i:i + 1])
        torch.testing.assert_close(x_t[i:i + 1], theirs)
    assert flow.sigma(torch.tensor([999])).item() == 1.0 and flow.init_noise_sigma == 1.0
    v = flow.training_target(x0, eps, t, "flow")
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(flow.to_x0(v, x_t, t, "flow"), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.to_x0(eps[:4], x_t[:4], t[:4], "epsilon"), x0[:4], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not 'v_prediction'"):
        flow.to_x0(v, x_t, t, "v_prediction")


def test_edm_sigmas_are_karras_ascending():
    s = EDMSchedule().sigmas
    assert len(s) == 1000 and torch.all(s[1:] > s[:-1])
    assert abs(s[0].item() - 0.002) < 1e-9 and abs(s[-1].item() - 80.0) < 1e-6
    i = torch.arange(1000, dtype=torch.float64) / 999
    karras = (0.002 ** (1 / 7) + i * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, karras)


@pytest.mark.parametrize("schedule, sampler", [("vp", "ddim"), ("vp", "dpmpp-2m"), ("vp", "euler"), ("vp", "heun"),
                                               ("flow", "euler")])
def test_teacher_ode_reaches_the_mixture(schedule, sampler):
    teacher = GMMTeacher(GMMConfig(schedule=schedule))
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    x = teacher_ode(teacher, z, None, steps=50, sampler=sampler)
    m = teacher.mixture.mode_metrics(x)
    assert m["precision"] > 0.97
    assert all(0.8 < r < 1.2 for r in m["mode_mass_ratio"])


def test_teacher_one_step_from_noise_is_not_the_mixture():
    """The teacher's own one-step x0 prediction collapses to the mean: it fails the mode test."""
    teacher = GMMTeacher(GMMConfig())
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(0))
    x = teacher.denoise(z, torch.full((10000,), 999), None)
    assert teacher.mixture.mode_metrics(x)["precision"] < 0.2


def test_mode_metrics_definition():
    m = Mixture(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    x = torch.tensor([[0.5, 0.0], [9.0, 0.0], [10.0, 2.9], [5.0, 0.0]])
    out = m.mode_metrics(x)
    assert out["precision"] == 0.75          # (5, 0) is 5 std from both centres
    # nearest: centre 0 gets 2 of 4 (weight 0.25 -> ratio 2.0), centre 1 gets 2 (0.75 -> 0.667)
    assert out["mode_mass_ratio"][0] == pytest.approx(2.0)
    assert out["mode_mass_ratio"][1] == pytest.approx(2 / 3)


def fakes(mixture, n: int, seed: int) -> dict:
    """Samples that precision and mode mass cannot tell from the mixture (issue 25): a uniform
    ring, everything collapsed onto the centres, modes 1.5 times too wide or too tight."""
    import math

    g = torch.Generator().manual_seed(seed)
    exact, labels = mixture.sample(n, g)
    centres, std = mixture.means[labels], mixture.stds[labels, None]
    noise = torch.randn(n, mixture.dim, generator=g, dtype=torch.float64)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    radius = mixture.means[0].norm()
    ring = torch.zeros(n, mixture.dim, dtype=torch.float64)
    ring[:, 0], ring[:, 1] = radius * angle.cos(), radius * angle.sin()
    return {"exact": exact, "ring": ring + 0.3 * noise, "collapsed": centres + 0.05 * noise,
            "wide": centres + 1.5 * std * noise, "tight": centres + std * noise / 1.5}


MIXTURES = {   # the ring the recipes were tuned on, and others: unequal weights, tight and far apart, 8-D
    "ring": GMMConfig(),
    "unequal": GMMConfig(weights=[4, 1, 1, 2, 1, 1, 3, 1]),
    "tight": GMMConfig(components=5, radius=6.0, std=0.2),
    "8d": GMMConfig(components=6, radius=4.0, std=0.5, dim=8),
}


def passes_mode_shape(m: dict) -> bool:
    return (all(0.8 <= r <= 1.2 for r in m["mode_spread_ratio"]) and m["far_share"] <= m["far_share_exact"] + 0.02
            and m["mode_energy"] < 0.02)


@pytest.mark.parametrize("name", MIXTURES)
def test_mode_shape_metrics_pass_the_mixture_and_fail_every_fake(name):
    """Exact samples pass; the ring, the collapse and modes 1.5 times too wide or too tight each
    fail, though precision and mass pass most of them, and they fail the looser bound that CI's
    trained recipe is held to as well. The reference is drawn independently."""
    mixture = Mixture.from_config(MIXTURES[name])
    samples = fakes(mixture, 5000, seed=1)
    results = {k: mixture.mode_metrics(x, seed=7) for k, x in samples.items()}
    from test_toy2d import has_the_modes_shape   # the trained recipe's looser bound (CI's recipe test)

    assert passes_mode_shape(results["exact"]) and has_the_modes_shape(results["exact"]), results["exact"]
    for fake in ("ring", "collapsed", "wide", "tight"):
        assert not passes_mode_shape(results[fake]), (fake, results[fake])
        assert not has_the_modes_shape(results[fake]), (fake, results[fake])
    # The spread ratio reads the width's direction in every mode (damped where the separating
    # radius truncates a wide mode: about 1.3 on the ring, 1.2 in 8-D, for 1.5).
    assert all(r > 1.15 for r in results["wide"]["mode_spread_ratio"]), results["wide"]
    assert all(0.6 < r < 0.75 for r in results["tight"]["mode_spread_ratio"]), results["tight"]
    if name == "ring":   # what the old metrics saw: the ring and the collapse look perfect
        assert results["ring"]["precision"] > 0.95 and results["collapsed"]["precision"] == 1.0
        assert all(0.8 < r < 1.2 for r in results["ring"]["mode_mass_ratio"])


def test_bridges_between_far_apart_modes_count_as_between_modes_not_as_width():
    """Exact samples of the tight mixture (centres 35 stds apart) with 5% moved onto the segments
    between neighbouring centres, what a one-step student draws: they are bridges, not width.
    Without the mode radius's cap at MODE_RADIUS_STDS stds (half the gap alone) no sample lay
    outside a mode, and the test fails."""
    mixture = Mixture.from_config(MIXTURES["tight"])
    g = torch.Generator().manual_seed(3)
    x, labels = mixture.sample(5000, g)
    bridge = torch.arange(len(x)) % 20 == 0
    along = torch.rand(int(bridge.sum()), 1, generator=g, dtype=torch.float64)
    start, end = mixture.means[labels[bridge]], mixture.means[(labels[bridge] + 1) % len(mixture.means)]
    x[bridge] = start + along * (end - start)
    m = mixture.mode_metrics(x, seed=7)
    assert 0.03 < m["far_share"] - m["far_share_exact"] < 0.05, m   # 5% x the segments' 77% beyond 4 stds of both ends
    assert all(0.9 < r < 1.1 for r in m["mode_spread_ratio"]), m
    assert not passes_mode_shape(m)


def test_energy_distance_is_szekelys_unbiased_statistic():
    from dmdcli.teachers.gmm import energy_distance

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() + 1
    between = sum((a - b).norm() for a in x for b in y) / 35
    within_x = sum((x[i] - x[j]).norm() for i in range(7) for j in range(7) if i != j) / 42
    within_y = sum((y[i] - y[j]).norm() for i in range(5) for j in range(5) if i != j) / 20
    expected = 2 * between - within_x - within_y
    assert energy_distance(x, y, chunk=3) == pytest.approx(expected.item(), rel=1e-9)


def test_generator_reads_its_noise_with_full_size_first_layer_weights():
    """nn.Linear draws weights uniform in +-1/sqrt(fan_in); the 32 time-embedding inputs widen the
    generator's fan-in from 2 to 34. Its noise columns are drawn as for 2 inputs (bound 0.71, not
    0.17), the embedding's as before; the critic keeps nn.Linear's draw throughout."""
    torch.manual_seed(0)
    teacher = GMMTeacher(GMMConfig())
    first = teacher.make_generator().body[0].weight
    assert 0.65 < first[:, :2].abs().max() <= 2 ** -0.5 and first[:, 2:].abs().max() <= 34 ** -0.5
    assert teacher.make_critic().body[0].weight.abs().max() <= 34 ** -0.5
