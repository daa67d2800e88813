"""Each term of the DMD2 objective alone, at the trainer's own random draws, gives exactly the
gradient of its formula computed here from the networks (issue 25, item 2): a term that is
detached, sign-flipped, fed the wrong prediction or the wrong input fails. The regression term's
test is in test_pairs.py (it needs a pair store)."""

import torch
import torch.nn.functional as F

from dmdcli.recipe import load_recipe
from dmdcli.sampling import generator_x0
from dmdcli.teachers import real_score
from dmdcli.trainer import DMDTrainer


def record_draws(tr):
    """Wrap the trainer's random draws so the test can recompute each term at the same ones."""
    drawn = {"inputs": [], "randn": [], "timesteps": []}
    inputs, randn, timesteps = tr._generator_inputs, tr._randn, tr._timesteps
    tr._generator_inputs = lambda n: drawn["inputs"].append(inputs(n)) or drawn["inputs"][-1]
    tr._randn = lambda shape: drawn["randn"].append(randn(shape)) or drawn["randn"][-1]
    tr._timesteps = lambda draw, n: drawn["timesteps"].append(timesteps(draw, n)) or drawn["timesteps"][-1]
    return drawn


def gradients_of_one_step(step, module):
    """The gradients `step()` accumulates on module's parameters (before clipping), the
    parameters then put back as they were, so the test's recomputation sees the same network."""
    params = list(module.parameters())
    before = [p.detach().clone() for p in params]
    got = [None] * len(params)
    # Summed over every backward that reaches a parameter (a second backward of the same term shows).
    hooks = [p.register_hook(lambda g, i=i: got.__setitem__(i, g.clone() if got[i] is None else got[i] + g))
             for i, p in enumerate(params)]
    step()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    assert all(g is not None for g in got), "the step left some parameters without a gradient"
    return got


def assert_gradients_equal(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert max(float(e.abs().max()) for e in expected) > 0


def drawn_fakes(tr, drawn):
    """The generator's samples (no gradient) from the drawn inputs, and their conditions."""
    (x_in, t_in, cond), = drawn["inputs"]
    with torch.no_grad():
        return generator_x0(tr.acc.unwrap_model(tr.generator), tr.schedule, x_in, t_in, cond), cond


def trainer_for(tiny_recipe, *overrides):
    return DMDTrainer(load_recipe(tiny_recipe(), ["train.critic_warmup_steps=0", "train.warmup_steps=0", *overrides]))


def test_dm_term_alone_gives_weight_times_the_normalised_score_difference(tiny_recipe):
    """With no GAN and no pairs, the generator's gradient is dm_weight x J^T (f - r) / (w N),
    DMD eq. 7-8: r the guided teacher's x0 and f the critic's x0 at the same x_t = G(z) noised at
    the drawn t, w = mean |x - r| per sample, N = x.numel(). Caught: the DM loss on x.detach()
    (no gradient), real and fake swapped (sign), the normaliser taken from f, x_t from other noise."""
    tr = trainer_for(tiny_recipe, "train.dm_weight=0.7", "teacher.gmm.conditional=true", "teacher.guidance=1.5")
    drawn = record_draws(tr)
    gen, critic = tr.acc.unwrap_model(tr.generator), tr.acc.unwrap_model(tr.critic)
    got = gradients_of_one_step(tr.generator_step, gen)
    (x_in, t_in, cond), = drawn["inputs"]
    t, eps = drawn["timesteps"][-1], drawn["randn"][-1]   # the noise z is drawn first
    x = generator_x0(gen, tr.schedule, x_in, t_in, cond)
    with torch.no_grad():
        x_t = tr.schedule.add_noise(x, eps, t)
        r = real_score(tr.teacher, x_t, t, cond, 1.5)
        f = tr.schedule.to_x0(critic(x_t, t, cond), x_t, t, critic.prediction_type)
        w = (x - r).abs().mean(dim=1, keepdim=True)
    expected = torch.autograd.grad(0.7 * (x * (f - r) / w).sum() / x.numel(), list(gen.parameters()))
    assert_gradients_equal(got, expected)


def test_critic_loss_alone_gives_the_gradient_of_the_teachers_own_loss(tiny_recipe):
    """With no GAN, the critic's gradient is that of its denoising loss on the generator's
    samples (no gradient into them) noised at the drawn t and eps, against the teacher's own
    training target (DMD eq. 6): the critic fed x instead of x_t, the target of other noise or
    the target's prediction type mixed up fails. Under the flow schedule the target is the
    velocity, so an epsilon target fails there too."""
    for schedule in ("vp", "flow"):
        tr = trainer_for(tiny_recipe, f'teacher.gmm.schedule="{schedule}"')
        drawn = record_draws(tr)
        critic = tr.acc.unwrap_model(tr.critic)
        got = gradients_of_one_step(tr.critic_step, critic)   # the critic's own turn: fresh samples
        x, cond = drawn_fakes(tr, drawn)
        t, eps = drawn["timesteps"][-1], drawn["randn"][-1]   # the noise z is drawn first
        pred = critic(tr.schedule.add_noise(x, eps, t), t, cond)
        target = tr.schedule.training_target(x, eps, t, critic.prediction_type)
        assert_gradients_equal(got, torch.autograd.grad(F.mse_loss(pred, target), list(critic.parameters())))


def test_edm_critic_loss_is_edms_weighted_x0_loss(tmp_path):
    """On an EDM teacher (the shipped Fashion-MNIST one) the critic's gradient is that of EDM's
    loss, lambda(sigma) |D(x + sigma eps; sigma) - x|^2 with lambda = 1/sigma^2 + 1/0.5^2 (EDM
    eq. 8): the weight dropped, or sigma taken from another draw, fails."""
    recipe = tmp_path / "edm.toml"
    recipe.write_text(f'[run]\nout = "{tmp_path / "run"}"\npreview_samples = 0\nlog_with = "none"\n'
                      '[teacher]\nname = "edm"\nedm.model = "fashion-mnist"\n'
                      '[train]\nbatch_size = 3\ncritic_warmup_steps = 0\nwarmup_steps = 0\n')
    tr = DMDTrainer(load_recipe(recipe))
    drawn = record_draws(tr)
    critic = tr.acc.unwrap_model(tr.critic)
    got = gradients_of_one_step(tr.critic_step, critic)
    x, cond = drawn_fakes(tr, drawn)
    t, eps = drawn["timesteps"][-1], drawn["randn"][-1]   # the noise z is drawn first
    sigma = tr.schedule.sigma(t).view(-1, 1, 1, 1)
    x_t = x + sigma * eps
    d = tr.schedule.to_x0(critic(x_t, t, cond), x_t, t, critic.prediction_type)
    loss = ((sigma ** -2 + 0.5 ** -2) * (d - x) ** 2).mean()
    assert_gradients_equal(got, torch.autograd.grad(loss, list(critic.parameters())))


def test_critic_gan_term_adds_weight_times_softplus_of_fake_and_minus_real_logits(tiny_recipe):
    """With the GAN head on, the critic's gradient is its denoising loss's plus gan.critic_weight x
    that of mean softplus(D(fake)) + mean softplus(-D(real)) (DMD2 eq. 4), the fakes noised at the
    drawn t and eps, the reals (exact mixture samples here) at their own t_r and noise, all in one
    critic call. Caught: fake and real logits swapped, the reals not noised."""
    tr = trainer_for(tiny_recipe, "gan.generator_weight=0.01", "gan.critic_weight=0.5")
    drawn = record_draws(tr)
    reals = []
    batch = tr.real.batch
    tr.real.batch = lambda *a, **k: reals.append(batch(*a, **k)) or reals[-1]
    critic = tr.acc.unwrap_model(tr.critic)
    got = gradients_of_one_step(tr.critic_step, critic)   # the critic's own turn
    x, cond = drawn_fakes(tr, drawn)
    (_, eps, eps_r), (t, t_r) = drawn["randn"], drawn["timesteps"]   # z, the fakes' noise, the reals'
    (images, labels), = reals
    real = (tr.schedule.add_noise(images, eps_r, t_r), t_r, tr.real.condition(labels, x.device))
    pred, logits = critic(tr.schedule.add_noise(x, eps, t), t, cond, real)
    n = len(x)
    loss = F.mse_loss(pred, tr.schedule.training_target(x, eps, t, critic.prediction_type)) + 0.5 * (
        F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean())
    assert_gradients_equal(got, torch.autograd.grad(loss, list(critic.parameters())))


def test_gan_term_alone_gives_weight_times_the_gradient_of_softplus_of_minus_the_logits(tiny_recipe):
    """With the DM weight 0, the generator's gradient is exactly gan.generator_weight x grad of
    mean softplus(-D(G(z) noised at t_g with eps_g)), D the critic's GAN head, at the trainer's
    own draws: a GAN term on x.detach(), with its sign flipped, or on un-noised samples fails."""
    tr = trainer_for(tiny_recipe, "gan.generator_weight=0.3", "gan.critic_weight=0.01", "train.dm_weight=0")
    drawn = record_draws(tr)
    gen, critic = tr.acc.unwrap_model(tr.generator), tr.acc.unwrap_model(tr.critic)
    got = gradients_of_one_step(tr.generator_step, gen)
    (x_in, t_in, cond), = drawn["inputs"]
    eps_g, t_g = drawn["randn"][-1], drawn["timesteps"][-1]   # the GAN pass draws last
    x = generator_x0(gen, tr.schedule, x_in, t_in, cond)
    logits = critic.logits(tr.schedule.add_noise(x, eps_g, t_g), t_g, cond)
    assert_gradients_equal(got, torch.autograd.grad(0.3 * F.softplus(-logits).mean(), list(gen.parameters())))
