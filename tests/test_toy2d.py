"""The algorithm, proven on the exact teacher. recipes/toy2d.toml (shortened) is DMD2 plus
regression on the teacher's ODE pairs: it must reach the mode targets and the modes' shape
(every mode's spread within 0.8..1.2 of the mixture's). The DM gradient is checked alone
(no pairs, which would teach the modes by themselves): under rectified flow it reaches the mode
targets, and flipped under VP it does not."""

from pathlib import Path

import pytest
import torch

from dmdcli import losses
from dmdcli.pairs import PairSettings, make_pairs
from dmdcli.recipe import load_recipe
from dmdcli.runs import load_student
from dmdcli.sampling import student_sample
from dmdcli.runner import distill
from dmdcli.teachers.gmm import GMMTeacher

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy2d.toml"
# The recipe's test variant: half its 31,000 iterations (the recipe until 2026-12-07) at batch
# 128 instead of 512, on 8,192 pairs instead of 32,768 (about 2 minutes on one thread; at batch
# 256 it took 4 minutes of CI's 15).
# The DM gradient alone is checked on the short variant: 4,000 iterations (500 critic warm-up,
# 700 generator steps) at batch 256 with the earlier 3-layer MLPs, about 40 s; flipped, at 2,000
# and the generator's rate at 1e-3 without decay, where the same run unflipped passes the mode
# test (precision 0.887, mass 0.89..1.18; at the recipe's 3e-3 with decay it still misses a mode
# at 2,000).
HALF = ["train.batch_size=256", "run.preview_samples=0"]
QUARTER = ["train.steps=15500", "train.lr_decay_steps=15000", "train.batch_size=128", "run.preview_samples=0"]
SHORT = ["train.steps=4000", "train.lr_decay_steps=3500", "teacher.gmm.layers=3", *HALF]
EARLY = ["train.steps=2000", "train.lr_decay_steps=0", "train.lr_generator=1e-3"]
NO_PAIRS = ["regression.pairs=''"]


def train_and_measure(tmp_path: Path, overrides=SHORT, num_pairs: int = 8192) -> dict:
    recipe = load_recipe(RECIPE, [f"run.out={tmp_path / 'run'}", f"regression.pairs={tmp_path / 'pairs'}",
                                  *overrides])
    if recipe.regression.pairs:   # the recipe's make-pairs command (32,768 pairs there)
        make_pairs(GMMTeacher(recipe.teacher.gmm), Path(recipe.regression.pairs), num_pairs,
                   PairSettings(steps=50, sampler="heun", shard_size=8192), batch_size=4096)
    distill(recipe)
    _, teacher, generator, _ = load_student(recipe.run.out)
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    x = student_sample(generator, teacher.schedule, z, None, [999])
    return teacher.mixture.mode_metrics(x)


def passes_mode_test(m: dict) -> bool:
    return m["precision"] >= 0.85 and all(0.5 <= r <= 1.5 for r in m["mode_mass_ratio"])


def has_the_modes_shape(m: dict) -> bool:
    """Issue 25's target, every mode's spread within 0.8..1.2 of the mixture's, with at most 4
    points more samples between modes than exact samples have and the worst mode's energy
    distance under 0.2 mode stds (exact samples: below 0.01; the recipe's: below 0.01 on the
    ring, 0.03 with unequal weights).
    The recipe without its pairs, at batch 256 on the ring: spread 0.99..1.29, 5.2% between
    modes (exact: 1.4%), energy 0.09."""
    return (all(0.8 <= r <= 1.2 for r in m["mode_spread_ratio"]) and m["far_share"] <= m["far_share_exact"] + 0.04
            and m["mode_energy"] < 0.2)


def test_toy2d_recipe_gets_every_mode_and_its_shape(tmp_path):
    """The recipe beyond the ring it was tuned on: its modes weighted 4,1,1,2,1,1,3,1 (spread
    0.97..1.03, 2.1% between modes (exact 1.3%), energy 0.007, 5 layers on Heun's pairs; at
    batch 256 0.96..1.01, 2.0%). With the DM gradient flipped it fails (spread 1.00..1.16,
    energy 0.76); at regression weight 3 or 10 it would pass flipped, hence the recipe's 1. The
    recipe is strong enough at this size that its earlier breaks pass: no pairs (0.95..1.10, 2.8%
    at batch 256) and a SiLU generator (0.93..1.19, 3.4%, energy 0.07 with the 3-layer recipe); the
    regression term has its own test (test_pairs.py), the generator's draw test_gmm.py's, the DM
    term the flipped test below. `-m slow` runs the ring at the recipe's full size."""
    m = train_and_measure(tmp_path, [*QUARTER, "teacher.gmm.weights=[4,1,1,2,1,1,3,1]"])
    assert passes_mode_test(m) and has_the_modes_shape(m), m


def test_toy2d_dm_gradient_alone_covers_every_mode_under_flow(tmp_path):
    m = train_and_measure(tmp_path, [*SHORT, "teacher.gmm.schedule=flow", *NO_PAIRS])
    assert passes_mode_test(m), m


def test_toy2d_with_flipped_dm_gradient_fails(tmp_path, monkeypatch):
    """The mode test sees a wrong DM gradient. One noise path is enough: both reach
    losses.dm_gradient through the same call, after their own conversions to x0, and a wrong
    conversion fails the flow test above."""
    real = losses.dm_gradient

    def flipped(x, x0_real, x0_fake):
        grad, bad = real(x, x0_real, x0_fake)
        return -grad, bad

    monkeypatch.setattr(losses, "dm_gradient", flipped)
    m = train_and_measure(tmp_path, [*SHORT, *EARLY, *NO_PAIRS])   # 300 generator steps
    assert not passes_mode_test(m), m


@pytest.mark.slow
def test_toy2d_full_recipe(tmp_path):
    """The recipe exactly as shipped (its 32,768 pairs; about 11 minutes on 2 cores), as recorded in
    BENCHMARKS.md."""
    m = train_and_measure(tmp_path, [], num_pairs=32768)
    assert passes_mode_test(m) and has_the_modes_shape(m), m
