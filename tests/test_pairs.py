"""make-pairs: deterministic per-index noise, shards that resume and refuse mixed settings,
and DMD v1 training on them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from dmdcli.errors import UserError
from dmdcli.gmm import GMMTeacher
from dmdcli.pairs import PairSet, make_pairs, pair_noise
from dmdcli.recipe import GMMConfig
from dmdcli.sampling import teacher_ode


def test_pairs_are_pure_functions_of_seed_and_index(tmp_path):
    teacher = GMMTeacher(GMMConfig(conditional=True))
    manifest = make_pairs(teacher, tmp_path / "p", num=70, seed=7, steps=8, shard_size=32, batch_size=16)
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [32, 32, 6]
    pairs = PairSet(tmp_path / "p")
    for i in (0, 33, 69):
        z = pair_noise(7, [i], (2,))
        assert torch.equal(z[0], pairs.noise[i])
        assert pairs.label[i].item() == i % 8                 # labels by global index
        y = teacher_ode(teacher, z, torch.tensor([i % 8]), steps=8)
        assert torch.equal(y[0].float(), pairs.output[i])     # regenerated alone: bitwise equal
    assert not torch.equal(pair_noise(7, [1], (2,)), pair_noise(8, [1], (2,)))


def test_make_pairs_resumes_and_rebuilds_only_what_is_missing_or_corrupt(tmp_path):
    teacher = GMMTeacher(GMMConfig())
    out = tmp_path / "p"
    make_pairs(teacher, out, num=64, seed=0, steps=4, shard_size=16)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    reference = load_file(str(out / "shard-00002.safetensors"))
    (out / "shard-00001.safetensors").write_bytes(b"garbage")       # corrupt
    (out / "shard-00003.safetensors").unlink()                       # missing
    manifest = make_pairs(teacher, out, num=64, seed=0, steps=4, shard_size=16)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]
    assert after["shard-00002.safetensors"] == before["shard-00002.safetensors"]
    assert after["shard-00001.safetensors"] != before["shard-00001.safetensors"]
    assert torch.equal(load_file(str(out / "shard-00002.safetensors"))["noise"], reference["noise"])
    assert not list(out.glob(".*tmp*"))


def test_changed_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "16", "--out", str(out), "--steps", "4"]) == 0
    capsys.readouterr()
    assert main(["make-pairs", "--teacher", "gmm", "--num", "16", "--out", str(out), "--steps", "5"]) == 2
    assert f"{out} holds pairs made with other settings (steps differ); use another --out" in capsys.readouterr().err


def test_corrupt_shard_is_named_when_training(tmp_path, capsys):
    out = tmp_path / "p"
    make_pairs(GMMTeacher(GMMConfig()), out, num=16, steps=4, shard_size=8)
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserError, match=r"pair shard .*shard-00001.safetensors is missing or corrupt"):
        PairSet(out)


def test_dmd_v1_trains_on_pairs(tmp_path, tiny_recipe):
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "256", "--out", str(out), "--steps", "10"]) == 0
    path = tiny_recipe(method="dmd", steps=12, checkpoint_every=12,
                       extra=f'\n[regression]\npairs = "{out}"\ndistance = "pseudo_huber"\n')
    assert main(["distill", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_reg" in r for r in rows if "loss_dm" in r) and any("loss_reg" in r for r in rows)
