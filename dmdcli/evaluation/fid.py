"""Image FID and KID on clean-fid: its resizing, its feature networks, its formulas.

Features: clean-fid's Inception ("clean": PIL bicubic to 299, the TF-Inception port; or
"legacy_tensorflow": resizing inside the network, the protocol of EDM's ImageNet-64
reference statistics), or a TorchScript file the user gives, which receives what clean-fid's
Inception receives: float images in [0, 255], shape (B, 3, 299, 299), after clean resizing.
References: a samples file, a folder of images, an .npz of mu/sigma, `imagenet64` (EDM's
statistics in our cache), or one of clean-fid's named statistics.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..datasets import cache_dir
from ..utils.errors import UserError
from .fashion_classifier import WEIGHTS as FASHION_WEIGHTS
from .samples import within_class_spread
from ..utils.io import sha256

REFERENCES = {
    "imagenet64": {
        "url": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
        "file": "imagenet-64x64.npz", "sha256": None,   # none published: recorded on first use, then checked
        "mode": "legacy_tensorflow", "resolution": 64,
        "papers": "EDM ODE 2.32 (teacher), DMD 2.62, DMD2 1.28 (50K, class-conditional)",
    },
}
# clean-fid's named statistics: (resolution, split), fetched from its public address.
CLEANFID_NAMES = {"cifar10": (32, "train"), "ffhq": (1024, "trainval70k"), "lsun_church": (256, "train"),
                  "afhq_cat": (512, "train"), "afhq_dog": (512, "train"), "afhq_wild": (512, "train")}
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/{name}_{mode}_{split}_{res}.npz"
INCEPTION_FILE = "inception-2015-12-05.pt"
MODES = ("clean", "legacy_tensorflow")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or bool(os.environ.get("DMD_OFFLINE"))


def download(url: str, path: Path, what: str) -> Path:
    """Fetch url to path once (temporary name, then rename); offline, one line saying where to put it."""
    if path.is_file():
        return path
    if _offline():
        raise UserError(f"{what} is not available offline; download {url} to {path}")
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not download {what} from {url} ({e}); download it to {path} by hand") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_uint8_images(tensors: dict) -> torch.Tensor:
    """uint8 (N, 3, H, W) images from a samples file: its `image` tensor (decoded latents),
    else `x` when it holds images in [-1, 1] (gray is repeated to three channels)."""
    if "image" in tensors:
        img = tensors["image"]
    elif tensors["x"].ndim == 4 and tensors["x"].shape[1] in (1, 3):
        from ..teachers import uint8_images

        img = uint8_images(tensors["x"])
    else:
        raise UserError(f"these samples are not images (shape {tuple(tensors['x'].shape[1:])}); image FID needs "
                        f"pixel samples, or latent samples written by `dmd sample` with their decoded images")
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """The COCO-30K protocol's preprocessing (SPEC section 9): the central square of an
    H x W x C uint8 image, resized to size x size (PIL bicubic)."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(img[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.BICUBIC))


def _check_crop(size: int) -> None:
    if size < 0:
        raise UserError(f"--crop must be 0 (off) or a size in pixels, got {size}")


def _crop_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    _check_crop(size)
    if not size:
        return images
    out = [center_crop_resize(im.permute(1, 2, 0).numpy(), size) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# Feature networks shipped with the package, by name.
SHIPPED_FEATURES = {"fashion": FASHION_WEIGHTS}
# Statistics shipped with the package, each valid for one feature network only. Made by
# `dmd fid-ref fashion-mnist --split test --size 32 --features fashion --out FILE`.
SHIPPED_REFERENCES = {"fashion-mnist": {"file": Path(__file__).parent.parent / "assets" / "fashion-mnist-test-stats.npz",
                                        "features": "fashion"}}


def shipped_or_path(features: str) -> str:
    """A shipped feature network's file for its name ("fashion"), else what was given."""
    return str(SHIPPED_FEATURES.get(features, features))


def feature_model(features: str, mode: str, device: torch.device):
    """clean-fid's Inception (ours to fetch into the cache, or a local copy of its file), a
    shipped feature network by name ("fashion": our Fashion-MNIST classifier, which also
    classifies, as safetensors weights of dmdcli.evaluation.fashion_classifier), or a TorchScript
    feature network of the user's."""
    features = shipped_or_path(features)
    if mode not in MODES:
        raise UserError(f"unknown FID mode {mode!r}: choose clean or legacy_tensorflow")
    if features == "inception" or Path(features).name == INCEPTION_FILE:
        from cleanfid.downloads_helper import inception_url
        from cleanfid.inception_torchscript import InceptionV3W

        path = Path(features) if features != "inception" else cache_dir() / "inception" / INCEPTION_FILE
        if features != "inception" and not path.is_file():
            raise UserError(f"feature network not found: {features}")
        download(inception_url, path, "the Inception network for FID")
        model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
        model = model.to(device).eval()
        return lambda x: model(x)
    path = Path(features)
    if not path.is_file():
        raise UserError(f"feature network not found: {features} (give a TorchScript file, or 'inception')")
    if path == SHIPPED_FEATURES["fashion"]:
        from .fashion_classifier import load_fashion_classifier

        return load_fashion_classifier(path, device)
    try:
        with warnings.catch_warnings():   # torch.jit.load's deprecation notice: the user chose TorchScript
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            model = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise UserError(f"{features} is not a TorchScript file ({str(e).splitlines()[0][:120]})") from None
    return model


def image_features(images: torch.Tensor, model, mode: str, device, batch_size: int = 64, progress=None,
                   label: str = "features") -> np.ndarray:
    """Features of uint8 images through clean-fid's own resize-and-extract path; with a rich
    `progress`, a task `label` advances as clean-fid takes each batch."""
    from cleanfid.fid import get_model_features

    batches = iter(images.split(batch_size))
    task = progress.add_task(label, total=len(images)) if progress is not None else None
    taken = 0

    def next_batch(z):   # clean-fid asks for exactly batch_size images per call, in order
        nonlocal taken
        if task is not None:   # the batches taken before this one are through the network
            progress.update(task, completed=taken)
        batch = next(batches).float()
        taken += len(batch)
        if len(batch) < batch_size:   # pad the last batch; the extra features are cut below
            batch = torch.cat([batch, batch[-1:].expand(batch_size - len(batch), -1, -1, -1)])
        return batch

    feats = get_model_features(next_batch, model, mode=mode, z_dim=1, num_gen=len(images), batch_size=batch_size,
                               device=device, verbose=False)[: len(images)]
    if task is not None:
        progress.update(task, completed=len(images))
    return feats


def folder_features(path: Path, model, mode: str, device, batch_size: int, crop: int = 0, progress=None,
                    label: str = "features, reference") -> np.ndarray:
    """Features of a folder's images, found, read and resized as clean-fid's get_folder_features
    does (its file list, dataset and batch function), with a rich `progress` task per batch."""
    from glob import glob

    from cleanfid.fid import EXTENSIONS, ResizeDataset, get_batch_features

    files = sorted(f for ext in EXTENSIONS for f in glob(os.path.join(path, f"**/*.{ext}"), recursive=True))
    if not files:
        raise UserError(f"no images in {path}")
    dataset = ResizeDataset(files, fdir=str(path), mode=mode)
    if crop:
        dataset.custom_image_tranform = lambda im: center_crop_resize(im, crop)
    task = progress.add_task(label, total=len(files)) if progress is not None else None
    feats = []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        feats.append(get_batch_features(batch, model, device))
        if task is not None:
            progress.advance(task, len(batch))
    return np.concatenate(feats)


def reference_stats(ref: str, model, mode: str, device, batch_size: int, crop: int = 0, progress=None) -> tuple:
    """(mu, sigma, features or None, description) of a reference; crop > 0: images are
    centre-cropped and resized to crop x crop first (statistics files must say the same)."""
    from .samples import load_samples

    _check_crop(crop)
    path = Path(ref)
    if ref in REFERENCES:
        path = _named_reference(ref)
    if ref in SHIPPED_REFERENCES:
        path = SHIPPED_REFERENCES[ref]["file"]
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path) as f:
                mu, sigma = f["mu"], f["sigma"]
                made_in = str(f["mode"]) if "mode" in f else None
                made_crop = int(f["crop"]) if "crop" in f else None   # files of other tools do not say
        except (KeyError, ValueError, OSError):
            raise UserError(f"{path} is not a statistics file (an .npz with arrays 'mu' and 'sigma')") from None
        if made_in is not None and made_in != mode:
            raise UserError(f"{path} was made in {made_in} mode, not {mode}; use --mode {made_in} or make "
                            f"new statistics with dmd fid-ref")
        if made_crop is not None and made_crop != crop:
            raise UserError(f"{path} was made with --crop {made_crop}, these samples with --crop {crop}; "
                            f"use the same for both")
        return mu, sigma, None, str(path)
    if path.is_dir() and not (path / "samples.safetensors").is_file():
        feats = folder_features(path, model, mode, device, batch_size, crop, progress)
        return feats.mean(0), np.cov(feats, rowvar=False), feats, f"folder {path} ({len(feats)} images)"
    if path.exists():
        feats = image_features(_crop_tensor(to_uint8_images(load_samples(path)[0]), crop), model, mode, device,
                               batch_size, progress, "features, reference")
        return feats.mean(0), np.cov(feats, rowvar=False), feats, f"samples {path} ({len(feats)})"
    if ref in CLEANFID_NAMES:
        res, split = CLEANFID_NAMES[ref]
        url = CLEANFID_STATS_URL.format(name=ref, mode=mode, split=split, res=res)
        stats = download(url, cache_dir() / "refs" / Path(url).name, f"clean-fid's statistics for {ref!r}")
        with np.load(stats) as f:
            return f["mu"], f["sigma"], None, f"clean-fid {ref} {split} {res}px ({mode})"
    raise UserError(f"unknown reference {ref!r}: give imagenet64, fashion-mnist, a clean-fid name ({', '.join(CLEANFID_NAMES)}), "
                    f"an .npz of mu/sigma, a folder of images or a samples file")


def _named_reference(name: str) -> Path:
    """The cached file of a named reference, checked against its sha256: the registry's when
    known, else the one recorded when we downloaded it (no checksum is published for EDM's
    statistics; a file put in the cache by hand has no record and is not checked)."""
    spec = REFERENCES[name]
    path = cache_dir() / "refs" / spec["file"]
    fetched = not path.is_file()
    download(spec["url"], path, f"reference statistics {name!r}")
    digest = sha256(path)
    record = path.with_name(path.name + ".sha256")
    if fetched and not spec["sha256"]:
        from ..utils.io import write_text

        write_text(record, digest + "\n")
    expected = spec["sha256"] or (record.read_text().strip() if record.is_file() else None)
    if expected is not None and digest != expected:
        raise UserError(f"{path} does not match the sha256 of {name!r} ({expected[:12]}..., recorded in "
                        f"{record.name if not spec['sha256'] else 'the registry'}); delete {path.name}"
                        f"{' and ' + record.name if not spec['sha256'] else ''} to download it again")
    return path


def check_reference_features(ref: str, features: str) -> None:
    """A shipped reference holds one feature network's statistics: say so before any sampling."""
    shipped = SHIPPED_REFERENCES.get(ref, {}).get("features")
    if shipped and features != shipped:
        raise UserError(f"reference {ref!r} holds statistics of the {shipped!r} features, not {features!r}; "
                        f"add --features {shipped}, or make statistics for {features!r} with `dmd fid-ref`")


def frechet(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Frechet distance, quietly: its square root of a singular covariance product
    (fewer samples than dimensions, or dimensions a feature network never uses) warns through
    SciPy and prints, where fid_report says it once in a note; newer SciPy also warns that
    clean-fid's call passes a deprecated argument."""
    import contextlib
    import io

    from cleanfid.fid import frechet_distance
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", LinAlgWarning)
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        # Where the square root of the covariance product comes out complex ("Imaginary component":
        # a singular product), clean-fid's own remedy, its 1e-6 diagonal offset, applied before the
        # square root instead of after it failed.
        for offset in (0.0, 1e-6):
            eye = np.eye(len(sigma1)) * offset
            try:
                return float(frechet_distance(mu1, sigma1 + eye, mu2, sigma2 + eye))
            except ValueError as e:
                if "Imaginary component" not in str(e):
                    raise
    raise UserError(f"the Frechet distance is undefined here: the square root of the covariance product is complex "
                    f"(the sets are too small for {len(sigma1)} feature dimensions); measure more samples")


def fid_report(tensors: dict, ref: str, features: str = "inception", mode: str = "clean",
               batch_size: int = 64, kid: bool = True, crop: int = 0, progress=None) -> dict:
    """FID (KID where the reference has features, class accuracy where the feature network
    classifies) of samples against `ref`; `progress` (a rich Progress) shows feature extraction."""
    from cleanfid.fid import kernel_distance

    if ref in REFERENCES:
        mode = REFERENCES[ref]["mode"]
    check_reference_features(ref, features)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    uncropped = to_uint8_images(tensors)   # not images: say so before any download
    images = _crop_tensor(uncropped, crop)
    model = feature_model(features, mode, device)
    # The reference first: a bad reference file is said before the samples' features are spent.
    mu_r, sigma_r, feats_r, described = reference_stats(ref, model, mode, device, batch_size, crop, progress)
    feats = image_features(images, model, mode, device, batch_size, progress, "features, samples")
    if mu_r.shape != feats.shape[1:]:
        raise UserError(f"reference {ref} has {mu_r.shape[0]}-d statistics but the features are "
                        f"{feats.shape[1]}-d; use the same --features for both")
    report = {"fid": frechet(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r),
              "num_samples": len(feats), "reference": described, "features": features, "mode": mode,
              "crop": crop,   # spread on the images as made; the COCO protocol's crops have one per prompt
              "within_class_spread": None if crop else within_class_spread(uncropped, tensors.get("label"))}
    notes = []
    if len(feats) <= feats.shape[1]:
        notes.append(f"FID on {len(feats)} samples, not more than the {feats.shape[1]} feature dimensions: the "
                     f"covariance is singular and the FID biased upwards; compare it only with FIDs on as many samples")
    if kid and feats_r is not None:
        np.random.seed(0)   # clean-fid's KID draws subsets with numpy's global generator
        report["kid"] = float(kernel_distance(feats, feats_r))
    elif kid:
        notes.append(f"no KID: it needs the reference's features, and {described} holds only their mean and "
                     f"covariance")
    report["notes"] = notes
    if hasattr(model, "classify") and "label" in tensors:
        # A feature network that can also classify judges class-conditional samples.
        with torch.no_grad():
            pred = torch.cat([model.classify(part.float().to(device)).argmax(1).cpu()
                              for part in images.split(batch_size)])
        report["class_accuracy"] = float((pred == tensors["label"]).float().mean())
    return report


def make_reference(source: str, out: Path, features: str = "inception", mode: str = "clean",
                   batch_size: int = 64, split: str = "test", size: int = 0, crop: int = 0, progress=None) -> dict:
    """mu/sigma of a folder, samples file or dataset (fashion-mnist, imagefolder:PATH, a Hub
    dataset) written as an .npz (under a temporary name, then renamed)."""
    from ..datasets import load_images
    from ..utils.io import atomic_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = feature_model(features, mode, device)
    if Path(source).exists():
        mu, sigma, feats, described = reference_stats(source, model, mode, device, batch_size, crop, progress)
        count = len(feats) if feats is not None else 0
    else:
        images, _, _ = load_images(source, split, size)   # size: the students' (fashion: 32, padded)
        uint8 = ((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
        feats = image_features(_crop_tensor(uint8, crop), model, mode, device, batch_size, progress)
        mu, sigma, count = feats.mean(0), np.cov(feats, rowvar=False), len(feats)
    network = Path(shipped_or_path(features))   # which weights made the statistics
    with atomic_path(Path(out)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, count=count, features=features, mode=mode, crop=crop,
                     features_sha256=sha256(network) if network.is_file() else "")
    return {"count": count, "dim": int(mu.shape[0])}


def fid_rows(report: dict) -> list[tuple[str, str]]:
    """`dmd fid`'s table: (metric, value) rows of a fid_report (with its CLIP score if measured)."""
    n = report["num_samples"]
    rows = [(f"FID ({n} samples)", f"{report['fid']:.3f}")]
    if "kid" in report:
        rows.append((f"KID ({n} samples)", f"{report['kid']:.5f}"))
    if "class_accuracy" in report:
        rows.append(("class accuracy (by the feature network)", f"{report['class_accuracy']:.3f}"))
    if report["within_class_spread"] is not None:
        rows.append(("within-class spread (per-pixel std)", f"{report['within_class_spread']:.3f}"))
    if "clip_score" in report:
        rows.append((f"CLIP score ({report['clip_model']})", f"{report['clip_score']:.2f}"))
    return rows + [("reference", report["reference"])]
