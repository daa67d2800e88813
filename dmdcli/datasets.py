"""Image datasets for teacher training and GAN/reference images, offline first.

`fashion-mnist`: Debian's `dataset-fashion-mnist` package files when present (read by
torchvision's FashionMNIST, shapes checked), else the Hub copy
`zalando-datasets/fashion_mnist` through `datasets`. `imagefolder:PATH`: any folder of
class sub-folders, through `datasets`. Images come back in [-1, 1], labels as integers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .utils.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    return Path(os.environ.get("DMD_CACHE", Path.home() / ".cache" / "dmd"))


def _fashion_mnist(train: bool):
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    root = cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name.removesuffix(".gz")).is_file() for name, _ in FashionMNIST.resources):
        if not DEBIAN_FASHION_MNIST.is_dir():
            return None
        raw.mkdir(parents=True, exist_ok=True)
        for name, _ in FashionMNIST.resources:   # Debian recompressed them: other .gz md5 sums
            src = DEBIAN_FASHION_MNIST / name
            if not src.is_file():
                raise UserError(f"{src} is missing; reinstall dataset-fashion-mnist")
            tmp = raw / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, raw / name)
            try:
                extract_archive(str(raw / name), str(raw), remove_finished=True)
            except (OSError, EOFError) as e:
                raise UserError(f"could not unpack {name} into {raw} ({e}); delete {root} to rebuild") from None
    try:
        ds = FashionMNIST(str(root), train=train, download=False)
    except (RuntimeError, AssertionError, OSError, EOFError):
        raise UserError(f"Fashion-MNIST files in {raw} are damaged (a run killed while unpacking?); "
                        f"delete {root} to rebuild") from None
    if ds.data.shape[1:] != (28, 28) or len(ds.data) != (60000 if train else 10000):
        raise UserError(f"Fashion-MNIST in {raw} has an unexpected shape {tuple(ds.data.shape)}; delete it to rebuild")
    return ds.data.unsqueeze(1), ds.targets.long(), len(ds.classes)


def _hf_dataset(name: str, split: str, data_dir: str | None = None):
    """A `datasets` split with its image column named "image" (and a class column "label")."""
    import datasets

    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=split, cache_dir=str(cache_dir() / "hf"))
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise UserError(f"dataset {data_dir or name!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                        f"give imagefolder:PATH or fashion-mnist") from None
    image_columns = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
    if not image_columns:
        raise UserError(f"dataset {data_dir or name!r} has no image column (columns: {', '.join(ds.column_names)})")
    ds = ds.rename_column(image_columns[0], "image") if image_columns[0] != "image" else ds
    label_columns = [c for c, f in ds.features.items() if type(f).__name__ == "ClassLabel"]
    if label_columns and label_columns[0] != "label":
        ds = ds.rename_column(label_columns[0], "label")
    return ds


def _hf_chunks(ds, chunk: int = 1024):
    """(uint8 images (n, C, H, W), labels) of `chunk` rows at a time, every image in the first
    one's mode and size."""
    import numpy as np

    first = ds[0]["image"]
    mode = "L" if first.mode in ("L", "1", "I", "F") else "RGB"
    for start in range(0, len(ds), chunk):
        rows = ds[start:start + chunk]
        images = torch.from_numpy(np.stack([np.asarray(img.convert(mode).resize(first.size)) for img in rows["image"]]))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(rows["label"]).long() if "label" in rows else torch.zeros(len(images), dtype=torch.long)
        yield images, labels


def _hf(name: str, split: str, data_dir: str | None = None):
    parts = list(_hf_chunks(_hf_dataset(name, split, data_dir)))
    labels = torch.cat([p[1] for p in parts])
    return torch.cat([p[0] for p in parts]), labels, int(labels.max()) + 1


def image_chunks(spec: str, split: str = "train"):
    """(uint8 image chunks as stored, number of classes or None where it takes a pass to know)."""
    if spec == "fashion-mnist":
        got = _fashion_mnist(split == "train")
        if got is not None:
            return iter([got[:2]]), got[2]
        spec = "zalando-datasets/fashion_mnist"
    if spec.startswith("imagefolder:"):
        folder = spec.split(":", 1)[1]
        if not Path(folder).is_dir():
            raise UserError(f"image folder not found: {folder}")
        return _hf_chunks(_hf_dataset("imagefolder", split, data_dir=folder)), None
    return _hf_chunks(_hf_dataset(spec, split)), None


def at_size(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images (uint8, or floats in [-1, 1]) at image_size: padded with background where that
    centres them (28 -> 32, as DDPM did for MNIST), else resized (bilinear, antialiased; uint8
    rounded back to uint8)."""
    h = x.shape[-1]
    if h < image_size and (image_size - h) % 2 == 0:
        pad = (image_size - h) // 2
        return F.pad(x, (pad, pad, pad, pad), value=0 if x.dtype == torch.uint8 else -1.0)
    if h != image_size:
        y = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y
    return x


def load_images(spec: str, split: str = "train", image_size: int = 32, limit: int = 0):
    """(images in [-1, 1] (N, C, S, S), labels (N,), number of classes)."""
    if spec == "fashion-mnist":
        got = _fashion_mnist(split == "train") or _hf("zalando-datasets/fashion_mnist", split)
    elif spec.startswith("imagefolder:"):
        folder = spec.split(":", 1)[1]
        if not Path(folder).is_dir():
            raise UserError(f"image folder not found: {folder}")
        got = _hf("imagefolder", split, data_dir=folder)
    else:
        got = _hf(spec, split)
    images, labels, classes = got
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = images.float() / 127.5 - 1
    if image_size:   # 0: as stored
        x = at_size(x, image_size)
    return x.contiguous(), labels, classes


def load_text_column(spec: str) -> list[str]:
    """Texts of NAME[:column] from a Hub or local dataset (default column: the first of
    text, prompt, caption)."""
    import datasets

    name, _, column = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split="train", cache_dir=str(cache_dir() / "hf"))
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise UserError(f"prompt dataset {name!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                        f"give a text file with one prompt per line") from None
    column = column or next((c for c in ("text", "prompt", "caption") if c in ds.column_names), "")
    if column not in ds.column_names:
        raise UserError(f"prompt dataset {name!r} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                        f"give NAME:COLUMN")
    return list(ds[column])
