"""The algorithm, proven on the exact teacher: DMD2-style training of recipes/toy2d.toml
(shortened) reaches the mode targets under VP noise and under rectified flow (the same
mixture, teacher.gmm.schedule = "flow"); flipping the DM gradient's sign does not."""

from pathlib import Path

import pytest
import torch

from dmdcli import losses
from dmdcli.recipe import load_recipe
from dmdcli.runs import load_student
from dmdcli.sampling import student_sample
from dmdcli.runner import distill

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy2d.toml"
# The test variant: 4,000 iterations (500 critic warm-up, 700 generator steps) at batch 256,
# about 35 s on 2 cores. Seeds 0-2 reached precision 0.92-0.94 here.
SHORT = ["train.steps=4000", "train.batch_size=256", "run.preview_samples=0"]


def train_and_measure(tmp_path: Path, overrides=()) -> dict:
    recipe = load_recipe(RECIPE, [*SHORT, f"run.out={tmp_path / 'run'}", *overrides])
    distill(recipe)
    _, teacher, generator, _ = load_student(recipe.run.out)
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    x = student_sample(generator, teacher.schedule, z, None, [999])
    return teacher.mixture.mode_metrics(x)


def passes_mode_test(m: dict) -> bool:
    return m["precision"] >= 0.85 and all(0.5 <= r <= 1.5 for r in m["mode_mass_ratio"])


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_toy2d_student_covers_every_mode(tmp_path, schedule):
    m = train_and_measure(tmp_path, [f"teacher.gmm.schedule={schedule}"])
    assert passes_mode_test(m), m


def test_toy2d_with_flipped_dm_gradient_fails(tmp_path, monkeypatch):
    """The mode test sees a wrong DM gradient. One noise path is enough: both reach
    losses.dm_gradient through the same call, after their own conversions to x0, and a wrong
    conversion fails the flow half of the test above."""
    real = losses.dm_gradient

    def flipped(x, x0_real, x0_fake):
        grad, bad = real(x, x0_real, x0_fake)
        return -grad, bad

    monkeypatch.setattr(losses, "dm_gradient", flipped)
    m = train_and_measure(tmp_path)
    assert not passes_mode_test(m), m


@pytest.mark.slow
def test_toy2d_full_recipe(tmp_path):
    """The recipe exactly as shipped (about 90 s), as recorded in BENCHMARKS.md."""
    recipe = load_recipe(RECIPE, [f"run.out={tmp_path / 'run'}"])
    distill(recipe)
    _, teacher, generator, _ = load_student(recipe.run.out)
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    m = teacher.mixture.mode_metrics(student_sample(generator, teacher.schedule, z, None, [999]))
    assert passes_mode_test(m), m
