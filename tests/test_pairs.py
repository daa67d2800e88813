"""make-pairs: deterministic per-index noise, shards that resume and refuse mixed settings,
and DMD v1 training on them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from dmdcli.utils.errors import UserError
from dmdcli.teachers.gmm import GMMTeacher
from dmdcli.pairs import PairSet, PairSettings, make_pairs, pair_noise
from dmdcli.recipe import GMMConfig
from dmdcli.sampling import teacher_ode


def test_pairs_are_pure_functions_of_seed_and_index(tmp_path):
    teacher = GMMTeacher(GMMConfig(conditional=True))
    manifest = make_pairs(teacher, tmp_path / "p", 70, PairSettings(steps=8, seed=7, shard_size=32), batch_size=16)
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [32, 32, 6]
    pairs = PairSet(tmp_path / "p")
    for i in (0, 33, 69):
        z = pair_noise(7, [i], (2,))
        stored = pairs[i]
        assert torch.equal(z[0], stored["noise"])
        assert stored["label"].item() == i % 8                 # labels by global index
        y = teacher_ode(teacher, z, torch.tensor([i % 8]), steps=8)
        assert torch.equal(y[0].float(), stored["output"])     # regenerated alone: bitwise equal
    assert not torch.equal(pair_noise(7, [1], (2,)), pair_noise(8, [1], (2,)))


def test_samples_never_start_from_the_noise_of_a_pair():
    # Sample i of seed s used to start from pair i's noise of seed s: a DMD v1 student
    # was measured on the very noises it had been regressed on (1,024 of 2,000 samples).
    from dmdcli.evaluation.generate import sample_noise
    pairs = torch.cat([pair_noise(seed, range(256), (4,)) for seed in (0, 1, 7)])
    for seed in (0, 1, 7):
        starts = sample_noise(seed, range(256), (4,))
        renoise = sample_noise(seed, range(256), (4,), renoise=1)
        for z in (starts, renoise):
            assert torch.cdist(z, pairs).min() > 1e-3
        assert torch.cdist(starts, renoise).min() > 1e-3
        assert torch.equal(starts, sample_noise(seed, range(256), (4,)))   # still a pure function


def test_make_pairs_removes_the_temporary_file_of_a_run_killed_mid_write(tmp_path):
    teacher, out = GMMTeacher(GMMConfig()), tmp_path / "p"
    make_pairs(teacher, out, 64, PairSettings(steps=2, shard_size=32), batch_size=32)
    (out / "shard-00001.json").unlink()                               # shard 1 to be made again
    stale = [out / ".shard-00001.safetensors.tmp-999999", out / ".shard-00001.json.tmp-999999",
             out / ".manifest.json.tmp-999999"]
    for f in stale:
        f.write_bytes(b"half a shard")                                # a SIGKILL inside atomic_path
    assert make_pairs(teacher, out, 64, PairSettings(steps=2, shard_size=32), batch_size=32)["complete"]
    assert not list(out.glob(".*.tmp-*"))


def test_make_pairs_into_a_store_another_call_is_filling_is_refused(tmp_path):
    """Two calls into one store would each delete the other's half-written shard as stale."""
    import os

    from dmdcli.utils.io import try_lock

    out = tmp_path / "p"
    held = try_lock(out, "`dmd make-pairs`")
    (out / ".shard-00000.safetensors.tmp-4242").write_bytes(b"the other call's shard, half written")
    with pytest.raises(UserError, match=f"is in use by another `dmd make-pairs` \\(process {os.getpid()}\\); "
                                        f"let it finish, or choose another --out"):
        make_pairs(GMMTeacher(GMMConfig()), out, 16, PairSettings(steps=2, shard_size=8))
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".shard-00000.safetensors.tmp-4242"]
    held.close()


def test_make_pairs_resumes_and_rebuilds_only_what_is_missing_or_corrupt(tmp_path):
    teacher = GMMTeacher(GMMConfig())
    out = tmp_path / "p"
    make_pairs(teacher, out, 64, PairSettings(steps=4, shard_size=16))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    reference = load_file(str(out / "shard-00002.safetensors"))
    (out / "shard-00001.safetensors").write_bytes(b"garbage")       # corrupt
    (out / "shard-00003.safetensors").unlink()                       # missing
    manifest = make_pairs(teacher, out, 64, PairSettings(steps=4, shard_size=16))
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


def test_heun_pairs_made_on_the_old_trailing_grid_are_not_resumed(tmp_path, capsys):
    """Heun's and Euler's VP grid changed (T - 1 down to 0, was trailing): a folder whose manifest
    lacks the grid was made on the old one, and finishing it would mix the two."""
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "16", "--out", str(out), "--steps", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == "heun" and manifest.pop("grid") == "T - 1 down to 0"
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["make-pairs", "--teacher", "gmm", "--num", "16", "--out", str(out), "--steps", "4"]) == 2
    assert f"{out} holds pairs made with other settings (grid differ); use another --out" in capsys.readouterr().err


def test_corrupt_shard_is_named_when_training(tmp_path, capsys):
    out = tmp_path / "p"
    make_pairs(GMMTeacher(GMMConfig()), out, 16, PairSettings(steps=4, shard_size=8))
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[:-8])
    with pytest.raises(UserError, match=r"pair shard .*shard-00001.safetensors is corrupt \(sha256 mismatch\)"):
        PairSet(out)
    # Under a launch of n processes, process k hashes shards k, k + n, ...: each shard once.
    from dmdcli.pairs import check_shards, read_manifest

    manifest = read_manifest(out)
    assert check_shards(out, manifest, (0, 2)) == []
    assert check_shards(out, manifest, (1, 2)) == [f"pair shard {out / 'shard-00001.safetensors'} is corrupt "
                                                   f"(sha256 mismatch)"]


@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_regression_on_pairs_in_either_method(tmp_path, tiny_recipe, method):
    """v1 needs pairs; DMD2 given pairs adds the same regression term rather than ignoring them."""
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "256", "--out", str(out), "--steps", "10"]) == 0
    path = tiny_recipe(method=method, steps=12, checkpoint_every=12,
                       extra=f'\n[regression]\npairs = "{out}"\ndistance = "pseudo_huber"\n')
    assert main(["distill", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_reg" in r for r in rows if "loss_dm" in r) and any("loss_reg" in r for r in rows)


def test_pair_set_reads_the_same_rows_through_dataloader_workers(tmp_path):
    out = tmp_path / "p"
    make_pairs(GMMTeacher(GMMConfig(conditional=True)), out, 40, PairSettings(steps=3, shard_size=16))
    pairs = PairSet(out)
    direct = pairs.rows(torch.arange(40))
    loader = torch.utils.data.DataLoader(pairs, batch_size=8, num_workers=2, shuffle=False)
    got = {k: torch.cat([b[k] for b in loader]) for k in direct}
    for k in direct:
        assert torch.equal(got[k], direct[k])
    a = pairs.batch(5, torch.Generator().manual_seed(3))
    b = pairs.batch(5, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_named_by_pairs_check_and_distill(tmp_path, tiny_recipe, capsys, damage):
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "40", "--out", str(out), "--steps", "3",
                 "--shard-size", "16"]) == 0
    assert main(["pairs-check", str(out)]) == 0
    assert main(["make-pairs", "--teacher", "gmm", "--num", "40", "--out", str(out), "--steps", "3",
                 "--shard-size", "16", "--verify", "10"]) == 0
    assert "every shard matches its hash and 10 regenerated pairs match" in capsys.readouterr().err
    path = out / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    else:
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["pairs-check", str(out)]) == 2
    assert f"dmd: error: pair shard {path} is corrupt (sha256 mismatch)" in capsys.readouterr().err
    recipe = tiny_recipe(method="dmd", extra=f'\n[regression]\npairs = "{out}"\n')
    assert main(["distill", str(recipe)]) == 2
    assert f"pair shard {path} is corrupt (sha256 mismatch); rerun the `dmd make-pairs` command" in capsys.readouterr().err


def test_verify_catches_pairs_that_disagree_with_their_noise(tmp_path, capsys):
    out = tmp_path / "p"
    teacher = GMMTeacher(GMMConfig())
    make_pairs(teacher, out, 16, PairSettings(steps=3, shard_size=16))
    from dmdcli.pairs import _write_shard

    tensors = load_file(str(out / "shard-00000.safetensors"))
    tensors["output"][4] += 0.5                  # a consistent file (hash rewritten) with a wrong pair
    _write_shard(out, 0, 0, tensors)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = json.loads((out / "shard-00000.json").read_text())["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["make-pairs", "--teacher", "gmm", "--num", "16", "--out", str(out), "--steps", "3",
                 "--verify", "16"]) == 2
    assert "pair 4: stored output differs from the teacher's by up to 0.5" in capsys.readouterr().err


def test_not_enough_disk_is_refused_before_work(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "100000 pairs need about 2.3 MiB and" in err and "free space, lower --num or choose another --out" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="dtype auto is bf16 on CUDA")
def test_pairs_of_an_auto_dtype_teacher_serve_a_float32_recipe_on_cpu(tmp_path, capsys):
    """`dtype = "auto"` is float32 on a CPU: pairs made without a recipe (the documented
    `make-pairs --teacher unet2d` command) belong to a recipe that says float32. Their
    guidance (here from --set teacher.guidance) must be the recipe's."""
    from tiny_models import save_tiny_unet2d, unet2d_recipe

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    pairs = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", "4",
                 "--steps", "2", "--set", "teacher.guidance=2", "--out", str(pairs)]) == 0
    manifest = json.loads((pairs / "manifest.json").read_text())
    assert manifest["teacher"]["dtype"] == "float32" and manifest["guidance"] == 2.0
    recipe = unet2d_recipe(tmp_path / "r.toml", teacher, tmp_path / "run", steps=1,
                           extra=f'method = "dmd"\n[regression]\npairs = "{pairs}"\n')
    text = recipe.read_text()
    recipe.write_text(text.replace(f'model = "{teacher}"\n', f'model = "{teacher}"\ndtype = "float32"\n'))
    assert recipe.read_text() != text
    assert main(["distill", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["distill", str(recipe), "--set", "teacher.guidance=3", "--set", f"run.out={tmp_path / 'r3'}"]) == 2
    assert (f"pairs in {pairs} were made at guidance 2.0 and the recipe's teacher uses 3.0; make pairs with "
            f"`dmd make-pairs --recipe RECIPE`") in capsys.readouterr().err.replace("\n", "")


def test_a_teacher_alone_samples_at_the_guidance_set_for_it(tmp_path):
    """`sample --teacher ... --set teacher.guidance=2` uses 2, as make-pairs does (it used 1)."""
    from tiny_models import save_tiny_unet2d

    from dmdcli.evaluation.samples import load_samples

    teacher = save_tiny_unet2d(tmp_path / "teacher")
    assert main(["sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--set",
                 "teacher.guidance=2", "--num", "2", "--teacher-steps", "1", "--out", str(tmp_path / "s")]) == 0
    assert load_samples(tmp_path / "s")[1]["source"].endswith("guidance 2.0")


@pytest.mark.parametrize("distance", ["mse", "pseudo_huber"])
def test_regression_term_alone_gives_weight_times_the_distance_gradient(tmp_path, tiny_recipe, distance):
    """With the DM weight 0 and no GAN, the generator's gradient is exactly
    regression.weight x grad d(G(z_pair), y_pair): a detached or dropped regression term fails."""
    import torch

    from dmdcli import losses
    from dmdcli.recipe import load_recipe
    from dmdcli.sampling import generator_x0
    from dmdcli.trainer import DMDTrainer

    out = tmp_path / "p"
    assert main(["make-pairs", "--teacher", "gmm", "--num", "64", "--out", str(out), "--steps", "4"]) == 0
    tr = DMDTrainer(load_recipe(tiny_recipe(method="dmd", extra=f'dm_weight = 0.0\n[regression]\npairs = "{out}"\n'
                                                                  f'weight = 0.3\ndistance = "{distance}"\n'),
                                ["train.critic_warmup_steps=0"]))
    drawn = {}
    batch = tr.pairs.batch
    tr.pairs.batch = lambda n, g, keep=slice(None): drawn.setdefault("zy", batch(n, g, keep))
    gen = tr.acc.unwrap_model(tr.generator)
    got = [None] * len(list(gen.parameters()))
    hooks = [p.register_hook(lambda g, i=i: got.__setitem__(i, g.clone())) for i, p in enumerate(gen.parameters())]
    before = [p.detach().clone() for p in gen.parameters()]
    tr.generator_step()
    for h in hooks:   # (they would also see the autograd.grad below)
        h.remove()
    z, y, _ = drawn["zy"]
    with torch.no_grad():
        for p, b in zip(gen.parameters(), before):
            p.copy_(b)
    gen.zero_grad()
    t = torch.full((len(z),), tr.recipe.student.timesteps[0], dtype=torch.long)
    x = generator_x0(gen, tr.schedule, z * tr.schedule.init_noise_sigma, t, None)
    expected = torch.autograd.grad(0.3 * losses.regression_loss(x, y, distance), list(gen.parameters()))
    assert all(g is not None for g in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert max(float(e.abs().max()) for e in expected) > 0
