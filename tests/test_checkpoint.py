"""Checkpoints: pickle-free round trips, hashes, and falling back past a corrupt one."""

import json

import pytest
import torch

from dmdcli.utils import checkpoint


def test_optimizer_state_round_trips_exactly(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(3):
        net(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    tree = {"opt": opt.state_dict(), "rng": torch.get_rng_state(), "step": 3, "name": "x", "none": None}
    checkpoint.save_tree(tmp_path, "state", tree)
    back = checkpoint.load_tree(tmp_path, "state")
    assert back["step"] == 3 and back["name"] == "x" and back["none"] is None
    assert torch.equal(back["rng"], tree["rng"])
    assert back["opt"]["param_groups"] == tree["opt"]["param_groups"]   # tuples and ints preserved
    for pid, state in tree["opt"]["state"].items():
        for k, v in state.items():
            assert torch.equal(back["opt"]["state"][pid][k], v)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["opt"])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_unstorable_objects_are_refused():
    with pytest.raises(TypeError, match="cannot store object"):
        checkpoint.flatten(object(), {})


def make_ckpt(run_dir, step):
    tmp = checkpoint.begin(run_dir, step)
    checkpoint.save_tree(tmp, "state", {"step": step, "w": torch.full((4,), float(step))})
    return checkpoint.commit(tmp, step, keep=5)


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path):
    make_ckpt(tmp_path, 10)
    newest = make_ckpt(tmp_path, 20)
    assert checkpoint.latest_valid(tmp_path) == newest
    data = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(data[:-4] + b"\0\0\0\1")
    with pytest.warns(UserWarning, match="step-00000020 is unusable .*state.safetensors does not match its sha256"):
        ckpt = checkpoint.latest_valid(tmp_path)
    assert ckpt.name == "step-00000010"
    assert checkpoint.load_tree(ckpt, "state")["step"] == 10


def test_half_written_checkpoint_is_never_listed(tmp_path):
    make_ckpt(tmp_path, 10)
    tmp = checkpoint.begin(tmp_path, 20)           # a kill before commit leaves only this
    checkpoint.save_tree(tmp, "state", {"step": 20})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010"]
    assert checkpoint.latest_valid(tmp_path).name == "step-00000010"


def test_manifest_lists_every_file(tmp_path):
    ckpt = make_ckpt(tmp_path, 5)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(files) == ["state.json", "state.safetensors"]
    assert checkpoint.verify(ckpt) is None
    (ckpt / "state.json").unlink()
    assert checkpoint.verify(ckpt) == "state.json is missing"
