"""Folders of row shards (safetensors files holding rows start..start+count of every tensor):
read a few rows at a time through safetensors' memory map, so that a process holds the rows
it asked for, not the data set; written shard by shard into a temporary folder renamed when
complete. The pair store and the prepared real data both live in such folders.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import sha256, write_json


class ShardRows:
    """Rows by global index from shards described by records {"file", "start", ...}; the
    files are opened lazily in each process (DataLoader workers reopen their own)."""

    def __init__(self, folder: Path, records: list[dict]):
        self.folder = Path(folder)
        self.shards = sorted(records, key=lambda r: r["start"])
        self.starts = torch.tensor([r["start"] for r in self.shards])
        self._handles: dict = {}

    def _open(self, k: int):
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.folder / self.shards[k]["file"]), framework="pt")
        return self._handles[k]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def keys(self) -> list[str]:
        return list(self._open(0).keys())

    def rows(self, indices: torch.Tensor, keys=None) -> dict:
        """{key: the rows of these global indices} (every key of the shards by default)."""
        keys = [k for k in self.keys() if keys is None or k in keys]
        shard_of = torch.searchsorted(self.starts, indices, right=True) - 1
        out = {k: [None] * len(indices) for k in keys}
        for pos, (i, k) in enumerate(zip(indices.tolist(), shard_of.tolist())):
            row = i - self.shards[k]["start"]
            for key in keys:
                out[key][pos] = self._open(k).get_slice(key)[row:row + 1]
        return {k: torch.cat(v) for k, v in out.items()}


def write_row_shards(folder: Path, chunks, manifest, shard_rows: int = 8192) -> Path:
    """Write chunks ({key: tensor} with rows first, any sizes) as shards of `shard_rows` rows
    and a manifest.json (`manifest()`, called once the chunks are spent, plus "count" and
    "shards") into a temporary folder, then rename it to `folder`. Where another process got
    there first, its folder is kept."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records, pending, count = [], [], 0

    def flush(rows: int):
        nonlocal pending
        merged = {k: torch.cat([c[k] for c in pending]) for k in pending[0]}
        head = {k: v[:rows].contiguous() for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        name = f"shard-{len(records):05d}.safetensors"
        save_file(head, str(tmp / name))
        start = records[-1]["start"] + records[-1]["count"] if records else 0
        records.append({"file": name, "start": start, "count": rows, "sha256": sha256(tmp / name)})
        pending = [rest] if len(next(iter(rest.values()))) else []

    for chunk in chunks:
        pending.append(chunk)
        count += len(next(iter(chunk.values())))
        while sum(len(next(iter(c.values()))) for c in pending) >= shard_rows:
            flush(shard_rows)
    if pending:
        flush(sum(len(next(iter(c.values()))) for c in pending))
    write_json(tmp / "manifest.json", {**manifest(), "count": count, "shards": records})
    try:
        os.replace(tmp, folder)
    except OSError:   # made meanwhile by another process (another node's, on a shared cache)
        if not (folder / "manifest.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
