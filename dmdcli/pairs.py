"""The pair store for DMD v1's regression loss: (noise, teacher ODE output) pairs.

Layout of a pairs folder:
  manifest.json            settings (teacher, sampler, steps, guidance, seed, shapes) + shards
  shard-00000.safetensors  tensors `noise`, `output` (and `label`: class or prompt index)
  shard-00000.json         this shard's index range and sha256, written after the shard
Every file is written under a temporary name and renamed. The noise of pair i is a pure
function of (seed, i), and conditions are assigned by global index (i % classes or
prompts), so any pair can be regenerated and checked, and shards can be made in any order
by any rank: the set is the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .utils.errors import UserError
from .utils.io import atomic_path, sha256, write_json
from .utils.processes import any_process, process_state
from .utils.shards import ShardRows
from .recipe import dotted
from .sampling import EDM_GRID_SAMPLERS, SAMPLERS, teacher_ode
from .teachers import uint8_images
from .utils.stopping import StopRequest, Stopped

FORMAT = "dmd-pairs/1"


@dataclass
class PairSettings:
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 1.0
    seed: int = 0
    shard_size: int = 1024
    decode: bool = False       # latent teachers: also store the decoded images (uint8)

    def check(self) -> None:
        if self.shard_size <= 0:
            raise UserError(f"--shard-size must be positive, got {self.shard_size}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")


def index_noise(seed: int, indices, shape: tuple[int, ...], stream: tuple[int, ...] = ()) -> torch.Tensor:
    """N(0, I) of each index i from a generator seeded by SeedSequence((seed, i, *stream)).
    Each stream is its own family of noises: `dmd sample` draws from another stream than the
    pairs, so that a student is never measured on the noises it was regressed on."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        s = int(np.random.SeedSequence([seed, int(i), *stream]).generate_state(1, np.uint64)[0])
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(s))
    return out


def pair_noise(seed: int, indices, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise of each pair index: SeedSequence((seed, i)), as since the first pair stores."""
    return index_noise(seed, indices, shape)


@torch.no_grad()
def teacher_pairs(teacher, indices, settings: PairSettings) -> dict:
    """Noise, ODE output and condition ids of the given pair indices (on the CPU)."""
    z = pair_noise(settings.seed, indices, teacher.sample_shape)
    y = teacher.condition_ids(indices)
    device = getattr(teacher, "device", torch.device("cpu"))
    cond = teacher.encode_condition(y.to(device) if y is not None else None)
    x = teacher_ode(teacher, z.to(device), cond, settings.steps, settings.guidance, settings.sampler)
    out = {"noise": z, "output": x.float().cpu()}
    if y is not None:
        out["label"] = y
    if settings.decode:
        out["image"] = uint8_images(teacher.to_images(x).cpu())
    return out


def check_free_space(out: Path, num: int, shape, decode: bool) -> None:
    """Refuse before the long work when the pairs cannot fit on the disk (the estimate counts
    noise and output in float32, labels, and decoded images at 8x the latent side)."""
    per_pair = 2 * 4 * math.prod(shape) + 8 + (3 * (8 * shape[-1]) ** 2 if decode else 0)
    need = num * per_pair
    existing = sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) if out.is_dir() else 0
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if need - existing > free:
        raise UserError(f"{num} pairs need about {_size(need)} and {probe} has {_size(free)} free; "
                        f"free space, lower --num or choose another --out")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _count(s: int, num: int, shard_size: int) -> int:
    return min(shard_size, num - s * shard_size)


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


def make_pairs(teacher, out: Path, num: int, settings: PairSettings, batch_size: int = 256,
               rank: int = 0, world: int = 1, barrier=lambda: None, progress_factory=None) -> dict:
    """Generate (or finish generating) `num` pairs into `out`; rank r makes shards s with
    s % world == r. Returns the manifest (on rank 0; {} elsewhere)."""
    out = Path(out)
    if num <= 0 or batch_size <= 0:
        raise UserError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    settings.check()
    if settings.decode and not hasattr(teacher, "vae"):
        raise UserError(f"--decode is for latent teachers (sd); the {teacher.name} teacher's outputs are images already")
    from .utils.processes import folder_in_use

    if rank == 0:   # before the folder is made
        check_free_space(out, num, teacher.sample_shape, settings.decode)
    with folder_in_use(out, "`dmd make-pairs`", "let it finish, or choose another --out"):
        return _make_pairs(teacher, out, num, settings, batch_size, rank, world, barrier, progress_factory)


def _make_pairs(teacher, out: Path, num: int, settings: PairSettings, batch_size: int, rank: int, world: int,
                barrier, progress_factory) -> dict:
    expected = {"format": FORMAT, "teacher": teacher.describe(), **asdict(settings),
                "sample_shape": list(teacher.sample_shape), "num_classes": teacher.num_classes, "dtype": "float32"}
    if teacher.family == "vp" and settings.sampler in EDM_GRID_SAMPLERS:   # not resumed from older pairs,
        expected["grid"] = "T - 1 down to 0"                                # made on the trailing grid
    manifest_path = out / "manifest.json"
    if rank == 0:
        for stale in out.glob(".*.tmp-*"):   # a killed call's half-written shard, record or manifest
            stale.unlink(missing_ok=True)     # (the folder is locked, and no rank writes before the barrier)
    if rank == 0 and not manifest_path.is_file():
        write_json(manifest_path, {**expected, "num": num, "complete": False, "shards": []})
        if getattr(teacher, "prompts", None):   # label i of a text teacher is line i of prompts.txt
            with atomic_path(out / "prompts.txt") as tmp:
                tmp.write_text("".join(p + "\n" for p in teacher.prompts))
    barrier()
    old = json.loads(manifest_path.read_text())
    changed = [k for k in expected if old.get(k) != expected[k]]
    if changed:
        raise UserError(f"{out} holds pairs made with other settings ({', '.join(changed)} differ); "
                        f"use another --out or delete the folder")
    num_shards = math.ceil(num / settings.shard_size)
    mine = [s for s in range(num_shards) if s % world == rank]
    todo = [s for s in mine if (_shard_done(out, s) or {}).get("count") != _count(s, num, settings.shard_size)]
    progress = progress_factory() if progress_factory else contextlib.nullcontext()
    with progress, StopRequest() as stop:
        if progress_factory:
            task = progress.add_task("pairs", total=sum(_count(s, num, settings.shard_size) for s in mine),
                                     completed=sum(_count(s, num, settings.shard_size) for s in mine if s not in todo))
        for s in todo:
            start, count = s * settings.shard_size, _count(s, num, settings.shard_size)
            parts: dict[str, list] = {}
            for b in range(start, start + count, batch_size):
                for k, v in teacher_pairs(teacher, range(b, min(b + batch_size, start + count)), settings).items():
                    parts.setdefault(k, []).append(v)
                if progress_factory:
                    progress.advance(task, min(batch_size, start + count - b))
                if stop.requested:   # the shard in hand is dropped: finished shards are all on disk
                    raise Stopped(stop.signum, f"stopped; {out} keeps its finished shards; run the same "
                                               f"command again to resume")
            _write_shard(out, s, start, {k: torch.cat(v).contiguous() for k, v in parts.items()})
    barrier()
    return finalize(out, num, num_shards) if rank == 0 else {}


def _write_shard(out: Path, s: int, start: int, tensors: dict) -> None:
    name = _shard_name(s)
    count = len(tensors["noise"])
    with atomic_path(out / f"{name}.safetensors") as tmp:
        # One metadata key: safetensors writes several in a per-process order, which would
        # make equal shards differ in bytes (and sha256) between ranks.
        save_file(tensors, str(tmp), metadata={"range": f"{start}:{count}"})
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


def read_manifest(folder: Path) -> dict:
    manifest_path = Path(folder) / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"pairs folder not found or not made by `dmd make-pairs`: {folder} "
                        f"(no manifest.json); run `dmd make-pairs ... --out {folder}` first")
    try:
        return json.loads(manifest_path.read_text())
    except ValueError:
        raise UserError(f"{manifest_path} is corrupt; rerun the `dmd make-pairs` command to rebuild it") from None


def check_shards(folder: Path, manifest: dict, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with the shard files (missing, truncated, flipped bits), one line each; with
    part = (k, n), only of every n-th shard from the k-th (process k of n hashes its share)."""
    problems = []
    for record in manifest.get("shards", [])[part[0]::part[1]]:
        path = Path(folder) / record["file"]
        if not path.is_file():
            problems.append(f"pair shard {path} is missing")
        elif sha256(path) != record["sha256"]:
            problems.append(f"pair shard {path} is corrupt (sha256 mismatch)")
    return problems


class PairSet(torch.utils.data.Dataset):
    """The pairs of a complete folder, memory-mapped shard by shard (safetensors' own mmap),
    opened lazily in each process, so DataLoader workers and ranks can share one folder."""

    def __init__(self, folder: str | Path, teacher=None, verify: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if not manifest.get("complete"):
            raise UserError(f"pairs in {folder} are incomplete; rerun the same `dmd make-pairs` command to finish them")
        if verify:   # each process hashes its share of the shards; all refuse together
            state = process_state()
            problems = check_shards(self.folder, manifest, (state.process_index, state.num_processes))
            if any_process(bool(problems)):
                raise UserError(f"{problems[0] if problems else 'a pair shard is missing or corrupt (another process names it)'}"
                                f"; rerun the `dmd make-pairs` command to rebuild it")
        if teacher is not None and manifest["teacher"] != teacher.describe():
            was, now = dotted(manifest["teacher"]), dotted(teacher.describe())
            changed = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
            raise UserError(f"pairs in {folder} were made by another teacher than the recipe's "
                            f"({manifest['teacher'].get('name')}; {', '.join(changed)} differ); make pairs with "
                            f"`dmd make-pairs --recipe RECIPE` so they use the recipe's teacher")
        self.manifest = manifest
        self.reader = ShardRows(self.folder, manifest["shards"])

    def __len__(self) -> int:
        return int(self.manifest["num"])

    def rows(self, indices: torch.Tensor) -> dict:
        """Rows of the given global indices, read from the mapped shards."""
        return self.reader.rows(indices, ("noise", "output", "label"))

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.rows(torch.tensor([i])).items()}

    def batch(self, n: int, generator: torch.Generator, keep: slice = slice(None)):
        """n pairs drawn uniformly with replacement by `generator` (resumable by its state), of
        which only the `keep` rows are read (a process's share of a global batch)."""
        rows = self.rows(torch.randint(0, len(self), (n,), generator=generator)[keep])
        return rows["noise"], rows["output"], rows.get("label")


def make_pairs_on_all_ranks(teacher, out: Path, num: int, settings: PairSettings, batch_size: int = 256,
                            progress_factory=None) -> dict:
    """make_pairs under `accelerate launch` (or alone): each process its own shards."""
    state = process_state()
    teacher.to(state.device)
    return make_pairs(teacher, out, num, settings, batch_size, state.process_index, state.num_processes,
                      state.wait_for_everyone, progress_factory if state.is_main_process else None)


def verify_pairs(folder: Path, teacher=None, count: int = 0, seed: int = 0, atol: float | None = None) -> list[str]:
    """Problems found: completeness, every shard's sha256, and (with a teacher) `count`
    pairs drawn by `seed` regenerated from their index: noise bitwise, output within atol
    (1e-4 for an fp32 teacher on the CPU; GPU kernels and bf16 differ more with the batch)."""
    if atol is None:
        on_cpu = getattr(teacher, "device", torch.device("cpu")).type == "cpu"
        atol = 1e-4 if on_cpu and getattr(teacher, "dtype", torch.float32) == torch.float32 else 5e-2
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = check_shards(folder, manifest)
    made = sum(r["count"] for r in manifest.get("shards", []))
    if not manifest.get("complete") or made != manifest.get("num"):
        problems.append(f"{folder} is incomplete ({made} of {manifest.get('num')} pairs); rerun the same "
                        f"`dmd make-pairs` command to finish it")
    if problems or teacher is None or count <= 0:
        return problems
    if manifest["teacher"] != teacher.describe():
        return [f"pairs in {folder} were made by another teacher than the one given"]
    settings = PairSettings(**{k: manifest[k] for k in asdict(PairSettings())})
    pairs = PairSet(folder, verify=False)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    stored, fresh = pairs.rows(idx), teacher_pairs(teacher, idx.tolist(), settings)
    for pos, i in enumerate(idx.tolist()):
        if not torch.equal(stored["noise"][pos], fresh["noise"][pos]):
            problems.append(f"pair {i}: stored noise differs from the noise of (seed, {i})")
        elif not torch.allclose(stored["output"][pos], fresh["output"][pos], atol=atol, rtol=0):
            diff = (stored["output"][pos] - fresh["output"][pos]).abs().max().item()
            problems.append(f"pair {i}: stored output differs from the teacher's by up to {diff:.3g}")
    return problems
