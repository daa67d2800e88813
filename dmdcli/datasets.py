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


def _hf(name: str, split: str, data_dir: str | None = None):
    import datasets

    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=split, cache_dir=str(cache_dir() / "hf"))
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise UserError(f"dataset {data_dir or name!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                        f"give imagefolder:PATH or fashion-mnist") from None
    import numpy as np

    image_columns = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
    if not image_columns:
        raise UserError(f"dataset {data_dir or name!r} has no image column (columns: {', '.join(ds.column_names)})")
    ds = ds.rename_column(image_columns[0], "image") if image_columns[0] != "image" else ds
    label_columns = [c for c, f in ds.features.items() if type(f).__name__ == "ClassLabel"]
    if label_columns and label_columns[0] != "label":
        ds = ds.rename_column(label_columns[0], "label")
    first = ds[0]["image"]
    mode = "L" if first.mode in ("L", "1", "I", "F") else "RGB"   # one mode and size for all
    size = first.size
    images = torch.from_numpy(np.stack([np.asarray(img.convert(mode).resize(size)) for img in ds["image"]]))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = (torch.as_tensor(ds["label"]).long() if "label" in ds.column_names
              else torch.zeros(len(ds), dtype=torch.long))
    return images, labels, int(labels.max()) + 1


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
    h = x.shape[-1]
    if not image_size:   # 0: as stored
        return x.contiguous(), labels, classes
    if h < image_size and (image_size - h) % 2 == 0:
        pad = (image_size - h) // 2   # 28 -> 32 by a border of background, as DDPM did for MNIST
        x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    elif h != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
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


def captioned_latents(teacher, spec: str, split: str = "train", chunk: int = 16):
    """(VAE latents, captions) of a captioned image dataset (imagefolder:PATH with a
    metadata.jsonl, or a Hub dataset with an image and a text/caption/prompt column) at the
    latent teacher's resolution (centre crop, bicubic resize), encoded once and cached."""
    import hashlib
    import json

    import datasets
    import numpy as np
    from safetensors.torch import load_file, save_file

    from .evaluation.fid import center_crop_resize
    from .utils.io import atomic_path, write_text

    size = teacher.sample_shape[-1] * teacher.vae_scale_factor
    key = hashlib.sha256(json.dumps([spec, split, teacher.describe()["model"], teacher.cfg.revision, size])
                         .encode()).hexdigest()[:16]
    path, texts = cache_dir() / "latents" / f"{key}.safetensors", cache_dir() / "latents" / f"{key}.json"
    if path.is_file() and texts.is_file():
        return load_file(str(path))["latents"], json.loads(texts.read_text())
    name, data_dir = ("imagefolder", spec.split(":", 1)[1]) if spec.startswith("imagefolder:") else (spec, None)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"image folder not found: {data_dir}")
    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=split, cache_dir=str(cache_dir() / "hf"))
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise UserError(f"dataset {data_dir or name!r} could not be loaded ({str(e).splitlines()[0][:160]})") from None
    image = next((c for c, f in ds.features.items() if type(f).__name__ == "Image"), None)
    text = next((c for c in ("text", "caption", "prompt") if c in ds.column_names), None)
    if image is None or text is None:
        raise UserError(f"gan.dataset {spec!r} needs an image column and a text, caption or prompt column "
                        f"(has {', '.join(ds.column_names)}); for a folder, add a metadata.jsonl with "
                        f'{{"file_name": ..., "text": ...}} lines')
    vae = teacher.vae
    dtype = next(vae.parameters()).dtype
    parts = []
    for start in range(0, len(ds), chunk):
        rows = ds[start:start + chunk]
        pixels = np.stack([center_crop_resize(np.asarray(im.convert("RGB")), size) for im in rows[image]])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x.to(teacher.device, dtype)).latent_dist.mean * vae.config.scaling_factor
        parts.append(z.float().cpu())
    latents, captions = torch.cat(parts), [str(t) for t in ds[text]]
    write_text(texts, json.dumps(captions))
    with atomic_path(path) as tmp:   # written last: its presence means both are complete
        save_file({"latents": latents.contiguous()}, str(tmp))
    return latents, captions


class RealData:
    """Real samples for DMD2's GAN loss: the exact mixture for the gmm teacher, VAE latents of
    captioned images for latent (sd) teachers, else images from a dataset at the teacher's
    sample shape (labels kept for class-conditional teachers)."""

    def __init__(self, teacher, spec: str):
        self.teacher = teacher
        self.mixture = getattr(teacher, "mixture", None)
        self.captions = None
        if self.mixture is not None and not spec:
            return
        if teacher.name == "sd":
            if not spec:
                raise UserError("the GAN loss needs real images: set gan.dataset to captioned images "
                                "(imagefolder:PATH with a metadata.jsonl, or a Hub dataset)")
            self.images, self.captions = captioned_latents(teacher, spec)
            return
        if not spec:
            raise UserError("the GAN loss needs real images: set gan.dataset (fashion-mnist, imagefolder:PATH "
                            "or a Hub dataset)")
        channels, size = teacher.sample_shape[0], teacher.sample_shape[-1]
        self.images, self.labels, classes = load_images(spec, "train", size)
        if self.images.shape[1] != channels:
            raise UserError(f"gan.dataset {spec!r} has {self.images.shape[1]} channel(s); the teacher makes {channels}")
        if teacher.num_classes and classes > teacher.num_classes:
            raise UserError(f"gan.dataset {spec!r} has {classes} classes; the teacher knows {teacher.num_classes}")

    def batch(self, n: int, generator: torch.Generator):
        """(samples, labels or None) drawn with `generator` (a CPU generator); for captioned
        data the "labels" are caption indices, turned into conditions by `condition`."""
        if self.mixture is not None:
            x, labels = self.mixture.sample(n, generator)
            return x.float(), (labels if self.teacher.num_classes else None)
        idx = torch.randint(0, len(self.images), (n,), generator=generator)
        if self.captions is not None:
            return self.images[idx], idx
        return self.images[idx], (self.labels[idx] if self.teacher.num_classes else None)

    def condition(self, labels, device):
        """What the critic takes as `cond` for a real batch."""
        if self.captions is not None:
            return self.teacher.encode_text([self.captions[i] for i in labels.tolist()])
        return self.teacher.encode_condition(labels.to(device) if labels is not None else None)
