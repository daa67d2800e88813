"""Host syncs per training iteration (issue 26, item 4). Every `.item()`, `.tolist()`, `float()`,
`int()` or `bool()` of a tensor waits for the device; the loop needs one per update (the finite
check that decides it) and one per log window, no more."""

import sys

import pytest
import torch

from dmdcli import runner
from dmdcli.recipe import load_recipe
from dmdcli.trainer import DMDTrainer

READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def count_syncs(monkeypatch):
    """Tensor reads made from dmdcli's own code (torch's internals are not ours to count)."""
    calls = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if "/dmdcli/" in caller:
                calls.append(f"{_name} at {caller.rsplit('/dmdcli/', 1)[1]}:{sys._getframe(1).f_lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


GAN = "\n[gan]\ngenerator_weight = 3e-3\ncritic_weight = 1e-2\n"


def test_one_sync_per_update(tiny_recipe, count_syncs):
    """DMD2 with the GAN head: a generator turn holds two updates (generator, critic), a critic
    turn one; each may read one flag from the device."""
    tr = DMDTrainer(load_recipe(tiny_recipe(extra=GAN)))
    per_step = []
    for _ in range(8):
        turn = tr.is_generator_turn()
        count_syncs.clear()
        logs = tr.train_step()
        per_step.append((turn, list(count_syncs)))
        assert ("loss_dm" in logs) == turn
    assert any(turn for turn, _ in per_step) and not all(turn for turn, _ in per_step)
    for turn, calls in per_step:
        assert len(calls) == (2 if turn else 1), calls


def test_a_stop_request_rides_on_the_update_sync(tiny_recipe, count_syncs):
    """The runner's stop flag is read with the critic's finite check, not in a sync (and, under
    several processes, an all-reduce) of its own."""
    tr = DMDTrainer(load_recipe(tiny_recipe()))
    for step in range(6):
        tr.stop_requested = step == 3
        turn = tr.is_generator_turn()
        count_syncs.clear()
        tr.train_step()
        assert len(count_syncs) == (2 if turn else 1), count_syncs
        assert tr.stopping == (step >= 3)


def test_the_log_window_is_read_in_one_sync(count_syncs):
    sums = {"loss_dm": torch.tensor(3.0), "loss_critic": torch.tensor(1.0), "skipped_critic": 2}
    count_syncs.clear()
    means = runner._window_means(sums, {"loss_dm": 3, "loss_critic": 2, "skipped_critic": 2})
    assert means == {"loss_critic": 0.5, "loss_dm": 1.0, "skipped_critic": 2.0}
    assert len(count_syncs) == 1, count_syncs


def test_text_conditions_need_no_sync(tmp_path, count_syncs):
    """SD: prompts are tokenised once; a batch's conditions are indexed on the device (a
    `.tolist()` of the labels each turn before), and equal the prompts' own embeddings."""
    from dmdcli.recipe import SDConfig
    from dmdcli.teachers.diffusers_unets import SDTeacher
    from tiny_models import save_tiny_sd

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shoe\na cat on a mat\nan old bridge at dusk\n")
    teacher = SDTeacher(SDConfig(model=str(save_tiny_sd(tmp_path / "sd")), prompts=str(prompts)))
    labels = torch.tensor([2, 0, 2])
    teacher.prompt_ids()
    count_syncs.clear()
    cond = teacher.encode_condition(labels)
    assert count_syncs == []
    torch.testing.assert_close(cond, teacher.encode_text(["an old bridge at dusk", "a red shoe", "an old bridge at dusk"]))
