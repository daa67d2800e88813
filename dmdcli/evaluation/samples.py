"""Sample files and the metrics computed on them.

A samples file is safetensors with `x` (N, ...) and optionally `label` (N,), and metadata
`teacher` (the teacher's description as JSON) and `source` (what made the samples).
For vector teachers (the GMM) the Frechet distance is computed in the data's own
coordinates, not Inception features, and labelled so; the formula is clean-fid's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..utils.errors import UserError
from ..utils.io import atomic_path

SAMPLES_FILE = "samples.safetensors"


def sample_tensors(x: torch.Tensor, labels: torch.Tensor | None, images: torch.Tensor | None = None) -> dict:
    """What a samples file holds: x as made, `image` (decoded uint8, latent teachers), `label`."""
    tensors = {"x": x.detach().float().cpu().contiguous()}
    if images is not None:
        tensors["image"] = images.cpu().contiguous()
    if labels is not None:
        tensors["label"] = labels.cpu().long()
    return tensors


def save_samples(path: Path, x: torch.Tensor, labels: torch.Tensor | None, teacher_desc: dict, source: str,
                 images: torch.Tensor | None = None, prompts: list[str] | None = None) -> None:
    """x as made; for latent teachers also `image`, the decoded uint8 images (for FID); for
    text teachers the prompts, which the labels index (each sample's caption, for CLIP score)."""
    tensors = sample_tensors(x, labels, images)
    meta = {"teacher": json.dumps(teacher_desc), "source": source}
    if prompts:
        meta["prompts"] = json.dumps(prompts)
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_samples(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a samples file, of SAMPLES_FILE inside a folder, or of an .npz
    of uint8 images (arr_0: N x H x W x C, as `sample --images npz` and ADM's tools write;
    an optional `label` array) whose tensors are `image` (N x C x H x W) and `label`."""
    path = Path(path)
    if path.is_dir():
        path = path / SAMPLES_FILE
    if not path.is_file():
        raise UserError(f"samples not found: {path}; make them with `dmd sample RUN --out DIR`")
    if path.suffix == ".npz":
        return _load_npz(path), {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors samples file ({e})") from None
    if "x" not in tensors:
        raise UserError(f"{path} holds no tensor named 'x'; it was not written by `dmd sample`")
    return tensors, meta


def _load_npz(path: Path) -> dict:
    import zipfile
    import zlib

    try:   # only the arrays used: images, and labels (ADM's class-conditional samples: arr_1)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("arr_0", "label", "arr_1") if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path} is not a readable .npz ({e})") from None
    img = arrays.get("arr_0")
    if img is None or img.dtype != np.uint8 or img.ndim != 4 or img.shape[3] not in (1, 3):
        raise UserError(f"{path} needs arr_0, uint8 images N x H x W x C (C 1 or 3), as `dmd sample --images "
                        f"npz` writes; got {None if img is None else (img.dtype, img.shape)}")
    tensors = {"image": torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()}
    label = arrays.get("label", arrays.get("arr_1"))
    if label is not None:
        if label.dtype.kind not in "iu" or label.shape != (len(img),):
            raise UserError(f"{path}: labels must be {len(img)} integers, one per image; got "
                            f"{label.dtype} {label.shape}")
        tensors["label"] = torch.from_numpy(label).long()
    return tensors


def within_class_spread(images: torch.Tensor, labels: torch.Tensor | None, chunk: int = 1024) -> float | None:
    """Mode-collapse gauge: the per-pixel standard deviation across the samples of one class
    (or prompt), averaged over pixels and classes, for uint8 images on a [-1, 1] scale. A
    generator that ignores its noise scores 0; compare it with the teacher's on the same
    conditions. Classes with one sample are skipped; None when no class has two. Streams in
    chunks, so 50K images cost per-pixel sums, not float copies of them all."""
    if images.ndim == 4 and images.shape[1] == 3 and torch.equal(images[:, 0], images[:, 1]) \
            and torch.equal(images[:, 0], images[:, 2]):
        images = images[:, :1]   # gray as three channels (a view or an npz's copies): one is the same measure
    groups = [torch.arange(len(images))] if labels is None else \
        [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    stds = []
    for idx in groups:
        if len(idx) < 2:
            continue
        total = torch.zeros(images.shape[1:], dtype=torch.float64)
        squares = torch.zeros_like(total)
        shift = images[idx[0]].double()   # sums of differences from one member: exact when all are alike
        for part in idx.split(chunk):
            x = (images[part].double() - shift) / 127.5
            total += x.sum(0)
            squares += (x * x).sum(0)
        n = len(idx)
        var = ((squares - total * total / n) / (n - 1)).clamp(min=0)
        stds.append(var.sqrt().mean())
    return float(torch.stack(stds).mean()) if stds else None


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sample sets (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance as fd

    a, b = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    return float(fd(a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)), b.mean(0), np.atleast_2d(np.cov(b, rowvar=False))))


def gmm_report(x: torch.Tensor, teacher_desc: dict, ref: str, seed: int = 0) -> dict:
    """Metrics of vector samples against the exact mixture (`ref` = "gmm") or a samples file."""
    from ..teachers.gmm import Mixture
    from ..recipe import GMMConfig, _build

    mixture = Mixture.from_config(_build(GMMConfig, teacher_desc["gmm"]))
    if ref == "gmm":
        reference, _ = mixture.sample(max(len(x), 10000), torch.Generator().manual_seed(seed))
        ref_name = "the exact mixture"
    else:
        reference, ref_name = load_samples(ref)[0]["x"], str(ref)
    if reference.shape[1:] != x.shape[1:]:
        raise UserError(f"reference {ref} has shape {tuple(reference.shape[1:])}, samples have {tuple(x.shape[1:])}")
    report = {"metric": "Frechet distance in GMM coordinates (not Inception FID)",
              "frechet_distance": frechet_distance(x, reference), "num_samples": len(x),
              "num_reference": len(reference), "reference": ref_name}
    report.update(mixture.mode_metrics(x, reference=reference if ref == "gmm" else None, seed=seed))
    return report


def gmm_rows(report: dict) -> list[tuple[str, str]]:
    """`dmd fid --ref gmm`'s table: (metric, value) rows of a gmm_report."""
    mass = report["mode_mass_ratio"]
    spread = [r for r in report["mode_spread_ratio"] if r == r]   # nan: a mode no sample reached
    return [("Frechet distance (GMM coords)", f"{report['frechet_distance']:.4f}"),
            ("precision (within 3 std of a mode)", f"{report['precision']:.3f}"),
            ("mode mass / true weight (min .. max)", f"{min(mass):.2f} .. {max(mass):.2f}"),
            ("mode spread / true spread (min .. max)",
             f"{min(spread):.2f} .. {max(spread):.2f}" if spread else "no mode reached"),
            ("share between modes (exact mixture)", f"{report['far_share']:.3f} ({report['far_share_exact']:.3f})"),
            ("energy distance to exact samples, worst mode (in its stds)", f"{report['mode_energy']:.4f}"),
            ("samples / reference", f"{report['num_samples']} / {report['num_reference']} ({report['reference']})")]
