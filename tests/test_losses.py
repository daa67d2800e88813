"""The DMD math (dmdcli/losses.py) against its definitions in SPEC sections 2-3."""

import torch

from dmdcli import losses


def test_dm_gradient_is_normalised_difference_over_numel():
    g = torch.Generator().manual_seed(0)
    # Per-sample scales differ by 100x, so a batch-wide normaliser would give other values.
    scale = torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1, 1)
    x = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * scale).requires_grad_()
    x0_real = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * scale
    x0_fake = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * scale
    loss, bad = losses.distribution_matching_loss(x, x0_real, x0_fake)
    loss.backward()
    w = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + losses.NORMALISER_EPS
    expected = (x0_fake - x0_real) / w / x.numel()
    assert bad == 0
    torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-15)
    batch_w = (x.detach() - x0_real).abs().mean()
    assert not torch.allclose(x.grad, (x0_fake - x0_real) / batch_w / x.numel(), rtol=1e-2)


def test_dm_gradient_points_from_fake_towards_real():
    """Descending the loss moves x by -grad, i.e. towards x0_real and away from x0_fake."""
    x = torch.zeros(1, 2, requires_grad=True)
    loss, _ = losses.distribution_matching_loss(x, torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]]))
    loss.backward()
    assert (x.grad < 0).all()


def test_dm_gradient_replaces_and_counts_non_finite():
    x = torch.ones(2, 3, requires_grad=True)
    fake = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0]])
    loss, bad = losses.distribution_matching_loss(x, torch.zeros(2, 3), fake)
    assert bad == 2 and torch.isfinite(loss)


def test_dm_timesteps_cover_20_to_980_inclusive():
    t = losses.dm_timesteps(200_000, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 980
    # Uniform: each of the 961 values gets about 208 draws.
    counts = torch.bincount(t - 20, minlength=961).float()
    assert counts.min() > 120 and counts.max() < 300


def test_dm_timesteps_keep_to_a_given_range():
    t = losses.dm_timesteps(20_000, 1000, torch.Generator().manual_seed(0), first=100, last=700)
    assert int(t.min()) == 100 and int(t.max()) == 700


def test_critic_timesteps_cover_whole_range():
    t = losses.critic_timesteps(100_000, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 0 and int(t.max()) == 999


def test_critic_loss_edm_weighting():
    x0 = torch.zeros(2, 1)
    pred = torch.ones(2, 1)
    sigma = torch.tensor([1.0, 0.5])
    # weights 1 + 4 = 5 and 4 + 4 = 8 -> mean 6.5
    assert losses.critic_loss_edm(pred, x0, sigma).item() == 6.5


def test_regression_distances():
    a, b = torch.zeros(4, 3, 8, 8), torch.full((4, 3, 8, 8), 0.5)
    assert losses.regression_loss(a, b, "mse").item() == 0.25
    assert losses.regression_loss(a, a, "pseudo_huber").item() == 0.0
    c = 0.00054 * (3 * 64) ** 0.5
    expected = (0.25 * 192 + c * c) ** 0.5 - c
    assert abs(losses.regression_loss(a, b, "pseudo_huber").item() - expected) < 1e-5


def test_classifier_free_guidance_standard_form():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert losses.classifier_free_guidance(u, c, 1.0).item() == 3.0   # s = 1: no guidance
    assert losses.classifier_free_guidance(u, c, 2.0).item() == 5.0


def test_gan_losses():
    z = torch.zeros(3)
    log2 = torch.log(torch.tensor(2.0))
    torch.testing.assert_close(losses.gan_generator_loss(z), log2)
    torch.testing.assert_close(losses.gan_critic_loss(z, z), 2 * log2)


def test_gan_losses_at_logits_where_the_sign_matters():
    """DMD2 eq. 4 away from 0, where softplus(x) != softplus(-x): the generator wants its
    fakes' logits high, the critic wants fakes low and reals high."""
    fake, real = torch.tensor([2.0, -1.0]), torch.tensor([3.0, 0.5])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(losses.gan_generator_loss(fake), (sp(-fake)).mean())
    torch.testing.assert_close(losses.gan_critic_loss(fake, real), sp(fake).mean() + sp(-real).mean())
    assert abs(losses.gan_generator_loss(fake).item() - 0.7201) < 1e-4
    assert abs(losses.gan_critic_loss(fake, real).item() - (1.2201 + 0.2613)) < 1e-3
    # Higher fake logits: lower generator loss, higher critic loss.
    assert losses.gan_generator_loss(fake + 1) < losses.gan_generator_loss(fake)
    assert losses.gan_critic_loss(fake + 1, real) > losses.gan_critic_loss(fake, real)
