"""The pair store for DMD v1's regression loss: (noise, teacher ODE output) pairs.

Layout of a pairs folder:
  manifest.json          settings (teacher, sampler, steps, guidance, seed, shapes) + shards
  shard-00000.safetensors  tensors `noise`, `output` (and `label` for class teachers)
  shard-00000.json         this shard's index range and sha256, written after the shard
Every file is written under a temporary name and renamed. The noise of pair i is a pure
function of (seed, i), and labels are assigned by global index (i % classes), so any pair
can be regenerated and checked, and shards can be made in any order by any rank.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .io import atomic_path, sha256, write_json
from .sampling import SAMPLERS, teacher_ode
from .stopping import StopRequest, Stopped

FORMAT = "dmd-pairs/1"


def pair_noise(seed: int, indices, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise of each pair index: N(0, I) from a generator seeded by SeedSequence((seed, i))."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        s = int(np.random.SeedSequence([seed, int(i)]).generate_state(1, np.uint64)[0])
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(s))
    return out


def _settings(teacher, num, seed, steps, sampler, guidance, shard_size) -> dict:
    return {"format": FORMAT, "teacher": teacher.describe(), "sampler": sampler, "steps": steps,
            "guidance": guidance, "seed": seed, "shard_size": shard_size,
            "sample_shape": list(teacher.sample_shape), "num_classes": teacher.num_classes,
            "dtype": "float32"}


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _shard_done(out: Path, s: int) -> dict | None:
    """The shard's record if its file is present and matches its sha256, else None."""
    record_path, data_path = out / f"{_shard_name(s)}.json", out / f"{_shard_name(s)}.safetensors"
    if not (record_path.is_file() and data_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None
    return record if sha256(data_path) == record.get("sha256") else None


def make_pairs(teacher, out: Path, num: int, seed: int = 0, steps: int = 50, sampler: str = "ddim",
               guidance: float = 1.0, shard_size: int = 1024, batch_size: int = 256,
               rank: int = 0, world: int = 1, progress_factory=None) -> dict:
    """Generate (or finish generating) `num` pairs into `out`; returns the manifest."""
    out = Path(out)
    if num <= 0 or shard_size <= 0 or batch_size <= 0:
        raise UserError("--num, --shard-size and --batch-size must be positive")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    settings = _settings(teacher, num, seed, steps, sampler, guidance, shard_size)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise UserError(f"{out} holds pairs made with other settings ({', '.join(changed)} differ); "
                            f"use another --out or delete the folder")
    elif rank == 0:
        write_json(manifest_path, {**settings, "num": num, "complete": False, "shards": []})

    num_shards = math.ceil(num / shard_size)
    mine = [s for s in range(num_shards) if s % world == rank]
    todo = [s for s in mine if (_shard_done(out, s) or {}).get("count") != min(shard_size, num - s * shard_size)]
    progress = progress_factory() if progress_factory else contextlib.nullcontext()
    with progress, StopRequest() as stop:
        if progress_factory:
            task = progress.add_task("pairs", total=sum(min(shard_size, num - s * shard_size) for s in mine),
                                     completed=sum(min(shard_size, num - s * shard_size) for s in mine if s not in todo))

        def advance(n: int) -> None:
            if progress_factory:
                progress.advance(task, n)
            if stop.requested:   # the shard in hand is dropped: finished shards are all on disk
                raise Stopped(stop.signum, f"stopped; {out} keeps its finished shards; run the same "
                                           f"command again to resume")

        for s in todo:
            _make_shard(teacher, out, s, num, seed, steps, sampler, guidance, shard_size, batch_size, advance)
    return finalize(out, num, num_shards) if rank == 0 else {}


def _make_shard(teacher, out, s, num, seed, steps, sampler, guidance, shard_size, batch_size, advance) -> None:
    start, count = s * shard_size, min(shard_size, num - s * shard_size)
    noise, outputs, labels = [], [], []
    for b in range(start, start + count, batch_size):
        idx = range(b, min(b + batch_size, start + count))
        z = pair_noise(seed, idx, teacher.sample_shape)
        y = teacher.condition_ids(idx)
        noise.append(z)
        outputs.append(teacher_ode(teacher, z, teacher.encode_condition(y), steps, guidance, sampler).float())
        if y is not None:
            labels.append(y)
        advance(len(idx))
    tensors = {"noise": torch.cat(noise), "output": torch.cat(outputs)}
    if labels:
        tensors["label"] = torch.cat(labels)
    name = _shard_name(s)
    with atomic_path(out / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"start": str(start), "count": str(count)})
    write_json(out / f"{name}.json", {"file": f"{name}.safetensors", "start": start, "count": count,
                                      "sha256": sha256(out / f"{name}.safetensors")})


def finalize(out: Path, num: int, num_shards: int) -> dict:
    """Gather the shard records into the manifest; complete once every shard is present."""
    manifest = json.loads((out / "manifest.json").read_text())
    records = [_shard_done(out, s) for s in range(num_shards)]
    manifest["shards"] = [r for r in records if r is not None]
    manifest["num"] = num
    manifest["complete"] = all(r is not None for r in records)
    write_json(out / "manifest.json", manifest)
    return manifest


class PairSet:
    """All pairs of a complete folder in memory; batches drawn by index with a torch.Generator."""

    def __init__(self, folder: str | Path, teacher=None):
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"pairs folder not found or not made by `dmd make-pairs`: {folder} "
                            f"(no manifest.json); run `dmd make-pairs ... --out {folder}` first")
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise UserError(f"pairs in {folder} are incomplete; rerun the same `dmd make-pairs` command to finish them")
        parts: dict[str, list] = {}
        for record in manifest["shards"]:
            path = folder / record["file"]
            if not path.is_file() or sha256(path) != record["sha256"]:
                raise UserError(f"pair shard {path} is missing or corrupt; rerun `dmd make-pairs` to rebuild it")
            for k, v in load_file(str(path)).items():
                parts.setdefault(k, []).append(v)
        self.noise = torch.cat(parts["noise"])
        self.output = torch.cat(parts["output"])
        self.label = torch.cat(parts["label"]) if "label" in parts else None
        self.manifest = manifest
        if teacher is not None and manifest["teacher"] != teacher.describe():
            raise UserError(f"pairs in {folder} were made by another teacher than the recipe's "
                            f"({manifest['teacher'].get('name')}, settings differ); make pairs with "
                            f"`dmd make-pairs --recipe RECIPE` so they use the recipe's teacher")

    def __len__(self) -> int:
        return len(self.noise)

    def batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.noise[idx], self.output[idx], (self.label[idx] if self.label is not None else None)
