"""Checkpoints without pickle: tensors in safetensors, structure in JSON, hashes in a manifest.

A checkpoint is a folder `step-NNNNNNNN/` written as a hidden temporary folder and renamed
when complete; `manifest.json` (written last) lists each file's sha256. Loading verifies
the hashes, so a truncated or corrupt checkpoint is named and skipped for the previous one.
Optimiser, learning-rate scheduler and RNG states are nested dicts of tensors and plain
values: `flatten` stores their tensors by path and the rest as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import sha256, write_json

PREFIX = "step-"


def flatten(obj, tensors: dict, path: str = "s"):
    """Replace every tensor in a nested structure by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, f"{path}.k{i}"), flatten(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten(obj, tensors: dict):
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_tree(folder: Path, name: str, tree) -> None:
    tensors: dict = {}
    skeleton = flatten(tree, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: Path, name: str):
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unflatten(json.loads((folder / f"{name}.json").read_text()), tensors)


def tmp_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".{PREFIX}{step:08d}.tmp"


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (any stale one is removed)."""
    tmp = tmp_path(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int) -> Path:
    """Hash every file, write the manifest, fsync, rename into place, rotate old ones."""
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    write_json(tmp / "manifest.json", {"step": step, "files": {n: sha256(tmp / n) for n in files}})
    final = tmp.parent / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)  # the rename is durable before any older checkpoint goes
    for old in list_checkpoints(tmp.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(ckpt: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, digest in files.items():
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if sha256(ckpt / name) != digest:
            return f"{name} does not match its sha256 (corrupt or truncated)"
    return None


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; warns about each bad one."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(f"checkpoint {ckpt} is unusable ({problem}); trying the previous one", stacklevel=2)
    return None


def newest_for_all(run_dir: Path) -> Path | None:
    """latest_valid, hashed by the main process alone and named to the others: every rank
    hashing the same checkpoint (about 21 GB for SD1.5) would read it once per process."""
    from .processes import main_says, process_state

    found = latest_valid(run_dir) if process_state().is_main_process else None
    name = main_says(found.name if found is not None else "")
    return Path(run_dir) / "checkpoints" / name if name else None


def step_of(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])
