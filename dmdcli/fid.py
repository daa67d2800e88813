"""Image FID and KID on clean-fid: its resizing, its feature networks, its formulas.

Features: clean-fid's Inception ("clean": PIL bicubic to 299, the TF-Inception port; or
"legacy_tensorflow": resizing inside the network, the protocol of EDM's ImageNet-64
reference statistics), or a TorchScript file the user gives, which receives what clean-fid's
Inception receives: float images in [0, 255], shape (B, 3, 299, 299), after clean resizing.
References: a samples file, a folder of images, an .npz of mu/sigma, `imagenet64` (EDM's
statistics in our cache), or one of clean-fid's named statistics.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .datasets import cache_dir
from .errors import UserError

REFERENCES = {
    "imagenet64": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
        "file": "imagenet-64x64.npz", "sha256": None,   # recorded on first download, then checked
        "mode": "legacy_tensorflow", "resolution": 64,
        "papers": "EDM ODE 2.32 (teacher), DMD 2.62, DMD2 1.28 (50K, class-conditional)",
    },
}
CLEANFID_NAMES = {"cifar10": 32, "ffhq": 1024, "lsun_church": 256, "afhq_cat": 512, "afhq_dog": 512, "afhq_wild": 512}


def to_uint8_images(tensors: dict) -> torch.Tensor:
    """uint8 (N, 3, H, W) images from a samples file: its `image` tensor (decoded latents),
    else `x` when it holds images in [-1, 1] (gray is repeated to three channels)."""
    if "image" in tensors:
        img = tensors["image"]
    elif tensors["x"].ndim == 4 and tensors["x"].shape[1] in (1, 3):
        img = ((tensors["x"].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        raise UserError(f"these samples are not images (shape {tuple(tensors['x'].shape[1:])}); image FID needs "
                        f"pixel samples, or latent samples written by `dmd sample` with their decoded images")
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img


def feature_model(features: str, mode: str, device: torch.device):
    if features != "inception":
        path = Path(features)
        if not path.is_file():
            raise UserError(f"feature network not found: {features} (give a TorchScript file, or 'inception')")
        try:
            model = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise UserError(f"{features} is not a TorchScript file ({str(e).splitlines()[0][:120]})") from None
        return model
    from cleanfid.features import build_feature_extractor

    try:
        return build_feature_extractor(mode, device, use_dataparallel=False)
    except Exception as e:  # urllib/requests errors when offline
        raise UserError(f"the Inception network for FID is not available offline ({type(e).__name__}); copy "
                        f"clean-fid's inception-2015-12-05.pt into {Path(os.environ.get('TMPDIR', '/tmp'))} "
                        f"or pass --features FILE") from None


def image_features(images: torch.Tensor, model, mode: str, device, batch_size: int = 64) -> np.ndarray:
    """Features of uint8 images through clean-fid's own resize-and-extract path."""
    from cleanfid.fid import get_model_features

    batches = iter(images.split(batch_size))

    def next_batch(z):   # clean-fid asks for exactly batch_size images per call, in order
        batch = next(batches).float()
        if len(batch) < batch_size:   # pad the last batch; the extra features are cut below
            batch = torch.cat([batch, batch[-1:].expand(batch_size - len(batch), -1, -1, -1)])
        return batch

    return get_model_features(next_batch, model, mode=mode, z_dim=1, num_gen=len(images), batch_size=batch_size,
                              device=device, verbose=False)[: len(images)]


def reference_stats(ref: str, model, mode: str, device, batch_size: int) -> tuple:
    """(mu, sigma, features or None, description) of a reference."""
    from .evaluate import load_samples

    path = Path(ref)
    if ref in REFERENCES:
        path = _named_reference(ref)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path) as f:
                mu, sigma = f["mu"], f["sigma"]
        except (KeyError, ValueError, OSError):
            raise UserError(f"{path} is not a statistics file (an .npz with arrays 'mu' and 'sigma')") from None
        return mu, sigma, None, str(path)
    if path.is_dir() and not (path / "samples.safetensors").is_file():
        from cleanfid.fid import get_folder_features

        feats = get_folder_features(str(path), model, num_workers=0, batch_size=batch_size, device=device,
                                    mode=mode, verbose=False)
        if len(feats) == 0:
            raise UserError(f"no images in {path}")
        return feats.mean(0), np.cov(feats, rowvar=False), feats, f"folder {path} ({len(feats)} images)"
    if path.exists():
        feats = image_features(to_uint8_images(load_samples(path)[0]), model, mode, device, batch_size)
        return feats.mean(0), np.cov(feats, rowvar=False), feats, f"samples {path} ({len(feats)})"
    if ref in CLEANFID_NAMES:
        from cleanfid.fid import get_reference_statistics

        try:
            mu, sigma = get_reference_statistics(ref, CLEANFID_NAMES[ref], mode=mode, split="train")
        except Exception as e:
            raise UserError(f"clean-fid's statistics for {ref!r} are not available offline ({type(e).__name__}); "
                            f"give --ref FOLDER or an .npz") from None
        return mu, sigma, None, f"clean-fid {ref} train"
    raise UserError(f"unknown reference {ref!r}: give imagenet64, a clean-fid name ({', '.join(CLEANFID_NAMES)}), "
                    f"an .npz of mu/sigma, a folder of images or a samples file")


def _named_reference(name: str) -> Path:
    spec = REFERENCES[name]
    path = cache_dir() / "refs" / spec["file"]
    if not path.is_file():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("DMD_OFFLINE")
        if offline:
            raise UserError(f"reference statistics {name!r} are not available offline; download {spec['url']} "
                            f"to {path}, or pass --ref with a local copy of {spec['file']}")
        import urllib.request

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            urllib.request.urlretrieve(spec["url"], tmp)
        except OSError as e:
            raise UserError(f"could not download {spec['url']} ({e}); download it to {path} by hand") from None
        os.replace(tmp, path)
    if spec["sha256"] and hashlib.sha256(path.read_bytes()).hexdigest() != spec["sha256"]:
        raise UserError(f"{path} does not match the sha256 of {name!r}; delete it to download again")
    return path


def fid_report(tensors: dict, ref: str, features: str = "inception", mode: str = "clean",
               batch_size: int = 64, kid: bool = True) -> dict:
    from cleanfid.fid import frechet_distance, kernel_distance

    if ref in REFERENCES:
        mode = REFERENCES[ref]["mode"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = feature_model(features, mode, device)
    images = to_uint8_images(tensors)
    feats = image_features(images, model, mode, device, batch_size)
    mu_r, sigma_r, feats_r, described = reference_stats(ref, model, mode, device, batch_size)
    if mu_r.shape != feats.shape[1:]:
        raise UserError(f"reference {ref} has {mu_r.shape[0]}-d statistics but the features are "
                        f"{feats.shape[1]}-d; use the same --features for both")
    report = {"fid": float(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r)),
              "num_samples": len(feats), "reference": described, "features": features, "mode": mode}
    if kid and feats_r is not None:
        np.random.seed(0)   # clean-fid's KID draws subsets with numpy's global generator
        report["kid"] = float(kernel_distance(feats, feats_r))
    if hasattr(model, "classify") and "label" in tensors:
        # A feature network that can also classify judges class-conditional samples.
        with torch.no_grad():
            pred = torch.cat([model.classify(part.float().to(device)).argmax(1).cpu()
                              for part in images.split(batch_size)])
        report["class_accuracy"] = float((pred == tensors["label"]).float().mean())
    return report


def make_reference(source: str, out: Path, features: str = "inception", mode: str = "clean",
                   batch_size: int = 64, split: str = "test") -> dict:
    """mu/sigma of a folder, samples file or dataset (fashion-mnist, imagefolder:PATH, a Hub
    dataset) written as an .npz (under a temporary name, then renamed)."""
    from .datasets import load_images
    from .io import atomic_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = feature_model(features, mode, device)
    if Path(source).exists():
        mu, sigma, feats, described = reference_stats(source, model, mode, device, batch_size)
        count = len(feats) if feats is not None else 0
    else:
        images, _, _ = load_images(source, split, 0)
        feats = image_features(((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1),
                               model, mode, device, batch_size)
        mu, sigma, count = feats.mean(0), np.cov(feats, rowvar=False), len(feats)
    with atomic_path(Path(out)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, count=count, features=features, mode=mode)
    return {"count": count, "dim": int(mu.shape[0])}
