"""Real samples for DMD2's GAN loss, prepared once and streamed.

A data set is prepared once per machine (the local main process; the others wait) into a
cache folder of row shards (utils/shards.py): images as uint8 at the teacher's size, or a
latent teacher's VAE latents of captioned images as bf16 with each caption's token ids (so a
batch's text needs no tokeniser on the host) and the captions in the manifest. Each
process then reads only the rows of its share of a batch through the memory map and converts
them on its device, so host memory does not grow with the data set (63 GB of fp32 per rank
for ImageNet-64 before). The cache key holds the source, the size and, for a folder, the
modification times of it and its sub-folders: adding or removing images makes a new cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .datasets import at_size, cache_dir, image_chunks
from .utils.errors import UserError
from .utils.processes import process_state
from .utils.shards import ShardRows, write_row_shards

# Per kind, so that a change to one does not prepare the other again. latents/2: each row
# carries its caption's token ids.
FORMATS = {"images": "dmd-real/1", "latents": "dmd-real/2"}


def _fingerprint(spec: str) -> list:
    """What identifies a source: a folder's own and its sub-folders' modification times."""
    if not spec.startswith("imagefolder:"):
        return [spec]
    folder = Path(spec.split(":", 1)[1])
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    return [spec, folder.stat().st_mtime_ns, sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()
                                                    if p.is_dir())]


def _prepared(kind: str, key_parts: list, make_chunks, meta) -> tuple[Path, dict]:
    """The cache folder for these parts, made by the local main process where missing."""
    key = hashlib.sha256(json.dumps([FORMATS[kind], kind, *key_parts]).encode()).hexdigest()[:16]
    folder = cache_dir() / "real" / key
    state = process_state()
    if state.is_local_main_process and not (folder / "manifest.json").is_file():
        write_row_shards(folder, make_chunks(), lambda: {"format": FORMATS[kind], "kind": kind, "source": key_parts[0],
                                                          **meta()})
    state.wait_for_everyone()
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        missing = [r["file"] for r in manifest["shards"] if not (folder / r["file"]).is_file()]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"the prepared data in {folder} is unreadable; delete {folder} to prepare it again") from None
    if missing:
        raise UserError(f"the prepared data in {folder} lacks {missing[0]}; delete {folder} to prepare it again")
    return folder, manifest


def prepare_images(spec: str, size: int) -> tuple[Path, dict]:
    """uint8 images (key "x", (N, C, size, size)) and labels ("label") of a data set's train split."""
    classes = {}

    def chunks():
        it, classes["n"] = image_chunks(spec, "train")
        for images, labels in it:
            classes["max"] = max(classes.get("max", 0), int(labels.max()) + 1 if len(labels) else 0)
            yield {"x": at_size(images, size), "label": labels}

    return _prepared("images", [*_fingerprint(spec), "train", size], chunks,
                     lambda: {"classes": classes.get("n") or classes.get("max", 0)})


def prepare_latents(teacher, spec: str, split: str = "train", chunk: int = 16) -> tuple[Path, dict]:
    """bf16 VAE latents ("x") and int32 caption token ids ("ids") of a captioned image data set
    (imagefolder:PATH with a metadata.jsonl, or a Hub dataset with an image and a
    text/caption/prompt column) at the latent teacher's resolution (centre crop, bicubic
    resize); the manifest's "captions" holds row i's caption at i."""
    import datasets
    import numpy as np

    from .evaluation.fid import center_crop_resize

    size = teacher.sample_shape[-1] * teacher.vae_scale_factor
    name, data_dir = ("imagefolder", spec.split(":", 1)[1]) if spec.startswith("imagefolder:") else (spec, None)
    captions = []

    def chunks():
        try:
            ds = datasets.load_dataset(name, data_dir=data_dir, split=split, cache_dir=str(cache_dir() / "hf"))
        except Exception as e:  # datasets raises many types for "not found / offline"
            raise UserError(f"dataset {data_dir or name!r} could not be loaded "
                            f"({str(e).splitlines()[0][:160]})") from None
        image = next((c for c, f in ds.features.items() if type(f).__name__ == "Image"), None)
        text = next((c for c in ("text", "caption", "prompt") if c in ds.column_names), None)
        if image is None or text is None:
            raise UserError(f"gan.dataset {spec!r} needs an image column and a text, caption or prompt column "
                            f"(has {', '.join(ds.column_names)}); for a folder, add a metadata.jsonl with "
                            f'{{"file_name": ..., "text": ...}} lines')
        for start in range(0, len(ds), chunk):
            rows = ds[start:start + chunk]
            pixels = np.stack([center_crop_resize(np.asarray(im.convert("RGB")), size) for im in rows[image]])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = teacher.encode_images(x)
            texts = [str(t) for t in rows[text]]
            captions.extend(texts)
            yield {"x": z.to(torch.bfloat16).cpu(), "ids": teacher.token_ids(texts)}

    return _prepared("latents", [*_fingerprint(spec), split, teacher.describe()["model"], teacher.cfg.revision,
                                 size], chunks, lambda: {"captions": captions})


class RealData:
    """Real samples for DMD2's GAN loss: the exact mixture for the gmm teacher, VAE latents of
    captioned images for latent (sd) teachers, else images from a data set at the teacher's
    sample shape (labels kept for class-conditional teachers)."""

    def __init__(self, teacher, spec: str):
        self.teacher = teacher
        self.mixture = getattr(teacher, "mixture", None)
        self.captions = None
        if self.mixture is not None and not spec:
            return
        if not spec:
            raise UserError("the GAN loss needs real images: set gan.dataset to " +
                            ("captioned images (imagefolder:PATH with a metadata.jsonl, or a Hub dataset)"
                             if teacher.name == "sd" else "fashion-mnist, imagefolder:PATH or a Hub dataset"))
        self.mixture = None
        if teacher.name == "sd":
            folder, manifest = prepare_latents(teacher, spec)
            self.captions = manifest["captions"]
        else:
            folder, manifest = prepare_images(spec, teacher.sample_shape[-1])
        self.count, self.store = manifest["count"], ShardRows(folder, manifest["shards"])
        if self.captions is None:
            channels = self.store.rows(torch.tensor([0]))["x"].shape[1]
            if channels != teacher.sample_shape[0]:
                raise UserError(f"gan.dataset {spec!r} has {channels} channel(s); the teacher makes "
                                f"{teacher.sample_shape[0]}")
            if teacher.num_classes and manifest["classes"] > teacher.num_classes:
                raise UserError(f"gan.dataset {spec!r} has {manifest['classes']} classes; the teacher knows "
                                f"{teacher.num_classes}")

    def batch(self, n: int, generator: torch.Generator, keep: slice = slice(None), device="cpu"):
        """(samples as float32 on `device`, labels or None): n rows drawn with `generator` (a CPU
        generator), of which only the `keep` rows are read (a process's share of a global
        batch). For captioned data the "labels" are the captions' token ids (see `condition`)."""
        if self.mixture is not None:
            x, labels = self.mixture.sample(n, generator)
            return x.float()[keep].to(device), (labels[keep] if self.teacher.num_classes else None)
        idx = torch.randint(0, self.count, (n,), generator=generator)[keep]
        rows = self.store.rows(idx)
        x = rows["x"].to(device)
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if self.captions is not None:
            return x, rows["ids"].to(device)
        return x, (rows["label"] if self.teacher.num_classes else None)

    def condition(self, labels, device):
        """What the critic takes as `cond` for a real batch."""
        if self.captions is not None:
            return self.teacher.encode_ids(labels)
        return self.teacher.encode_condition(labels.to(device) if labels is not None else None)
