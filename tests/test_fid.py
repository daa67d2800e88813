"""Image FID on clean-fid, with a small TorchScript feature network saved by the test."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from dmdcli.cli import main
from dmdcli.evaluation.samples import save_samples


@pytest.fixture
def features(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    return path


def image_set(seed, n=40, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 16, 16, generator=g) * 0.6 + 0.2 + shift).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def as_samples(path, images):
    save_samples(path, images.float() / 127.5 - 1, None, {"name": "unet2d"}, "test")
    return path


def as_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_fid_matches_clean_fid_called_directly(tmp_path, features, capsys):
    from cleanfid import fid as cfid

    a, b = image_set(0), image_set(1, shift=0.15)
    samples = as_samples(tmp_path / "a.safetensors", a)
    folder_a, folder_b = as_folder(tmp_path / "fa", a), as_folder(tmp_path / "fb", b)
    assert main(["fid", str(samples), "--ref", str(folder_b), "--features", str(features),
                 "--json", str(tmp_path / "r.json")]) == 0
    ours = json.loads((tmp_path / "r.json").read_text())
    assert "features, reference 40/40" in capsys.readouterr().err   # the folder, read with progress
    model = torch.jit.load(str(features))
    theirs = cfid.compute_fid(str(folder_a), str(folder_b), mode="clean", custom_feat_extractor=lambda x: model(x),
                              num_workers=0, device=torch.device("cpu"), verbose=False, batch_size=16)
    assert ours["fid"] == pytest.approx(theirs, rel=1e-4)
    assert ours["num_samples"] == 40 and "kid" in ours


def test_fid_of_a_set_against_itself_is_zero_and_by_hand_otherwise(tmp_path, features, capsys):
    from cleanfid.fid import get_model_features

    a, b = image_set(0), image_set(1, shift=0.15)
    sa, sb = as_samples(tmp_path / "a.safetensors", a), as_samples(tmp_path / "b.safetensors", b)
    assert main(["fid", str(sa), "--ref", str(sa), "--features", str(features), "--json", str(tmp_path / "s.json"),
                 "--batch-size", "16"]) == 0
    assert abs(json.loads((tmp_path / "s.json").read_text())["fid"]) < 1e-3
    # Feature extraction shows progress (plain lines here, not a terminal): the reference's, then the
    # samples', each complete only when its last batch (8 of 16 padded) is through.
    plain = [ln.split("  ")[0] for ln in capsys.readouterr().err.splitlines() if ln.startswith("features")]
    assert plain == ["features, reference 40/40", "features, samples 40/40"]
    assert main(["fid", str(sa), "--ref", str(sb), "--features", str(features), "--json", str(tmp_path / "d.json")]) == 0
    got = json.loads((tmp_path / "d.json").read_text())["fid"]
    model = torch.jit.load(str(features))
    it = {"a": iter(a.float().split(8)), "b": iter(b.float().split(8))}
    fa = get_model_features(lambda z: next(it["a"]), lambda x: model(x), num_gen=40, batch_size=8, z_dim=1,
                            device=torch.device("cpu"), verbose=False)
    fb = get_model_features(lambda z: next(it["b"]), lambda x: model(x), num_gen=40, batch_size=8, z_dim=1,
                            device=torch.device("cpu"), verbose=False)
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    by_hand = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert got == pytest.approx(by_hand, rel=1e-3)
    assert got > 1.0


def test_reference_files(tmp_path, features, monkeypatch, capsys):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sa = as_samples(tmp_path / "a.safetensors", image_set(0))
    assert main(["fid", str(sa), "--ref", "imagenet64", "--features", str(features)]) == 2
    err = capsys.readouterr().err
    assert "reference statistics 'imagenet64' is not available offline; download " \
           "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz to" in err
    # With a local file of the right format (here 16-d, to match the test's features): works.
    assert main(["fid-ref", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "ref.npz"),
                 "--features", str(features), "--mode", "legacy_tensorflow"]) == 0   # EDM's protocol
    ref = tmp_path / "cache" / "refs" / "imagenet-64x64.npz"
    ref.parent.mkdir(parents=True)
    ref.write_bytes((tmp_path / "ref.npz").read_bytes())
    assert main(["fid", str(sa), "--ref", "imagenet64", "--features", str(features),
                 "--json", str(tmp_path / "i.json")]) == 0
    report = json.loads((tmp_path / "i.json").read_text())
    assert abs(report["fid"]) < 1e-3 and report["mode"] == "legacy_tensorflow"
    # A wrong-format file: one line.
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    capsys.readouterr()
    assert main(["fid", str(sa), "--ref", str(tmp_path / "bad.npz"), "--features", str(features)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.npz is not a statistics file (an .npz with arrays 'mu' and 'sigma')" in err[0]
    # Statistics of other features: one line.
    np.savez(tmp_path / "other.npz", mu=np.zeros(5), sigma=np.eye(5))
    assert main(["fid", str(sa), "--ref", str(tmp_path / "other.npz"), "--features", str(features)]) == 2
    assert "has 5-d statistics but the features are 16-d" in capsys.readouterr().err


def test_missing_feature_file_is_one_line(tmp_path, capsys):
    sa = as_samples(tmp_path / "a.safetensors", image_set(0))
    assert main(["fid", str(sa), "--ref", str(sa), "--features", str(tmp_path / "none.pt")]) == 2
    assert f"feature network not found: {tmp_path / 'none.pt'}" in capsys.readouterr().err


def test_reference_folder_without_images_is_one_line(tmp_path, features, capsys):
    sa = as_samples(tmp_path / "a.safetensors", image_set(0))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert main(["fid", str(sa), "--ref", str(tmp_path / "empty"), "--features", str(features)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dmd: error: no images in {tmp_path / 'empty'}"


def test_bad_mode_and_offline_inception_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sa = as_samples(tmp_path / "a.safetensors", image_set(0))
    assert main(["fid", str(sa), "--ref", str(sa), "--mode", "fancy"]) == 2
    assert "unknown FID mode 'fancy': choose clean or legacy_tensorflow" in capsys.readouterr().err
    assert main(["fid", str(sa), "--ref", str(sa)]) == 2
    err = capsys.readouterr().err
    assert "the Inception network for FID is not available offline; download https://" in err
    assert str(tmp_path / "cache" / "inception" / "inception-2015-12-05.pt") in err


def test_center_crop_resize_takes_the_central_square():
    from dmdcli.evaluation.fid import center_crop_resize

    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert (center_crop_resize(img, 4) == img[:, 1:5]).all()          # same size: the crop alone
    assert center_crop_resize(img, 2).shape == (2, 2, 3)


def test_crop_applies_to_samples_and_references_alike(tmp_path, features, capsys):
    """--crop (the COCO-30K protocol): wide images whose centres agree and whose borders
    differ give FID about 0 with the crop and clearly more without; a statistics file made
    with another crop is refused in one line."""
    centre = image_set(3)                                    # 16x16 centres, shared
    border_a, border_b = image_set(4, shift=0.3), image_set(5, shift=-0.3)
    wide_a = torch.cat([border_a[..., :4], centre, border_a[..., -4:]], dim=-1)   # 16 x 24
    wide_b = torch.cat([border_b[..., :4], centre, border_b[..., -4:]], dim=-1)
    sa = as_samples(tmp_path / "a.safetensors", wide_a)
    folder = as_folder(tmp_path / "imgs", wide_b)
    assert main(["fid", str(sa), "--ref", str(folder), "--features", str(features), "--crop", "16",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["fid"]) < 1e-3 and report["crop"] == 16
    assert main(["fid", str(sa), "--ref", str(folder), "--features", str(features),
                 "--json", str(tmp_path / "r0.json")]) == 0
    uncropped = json.loads((tmp_path / "r0.json").read_text())
    assert uncropped["crop"] == 0 and uncropped["fid"] > 100 * max(abs(report["fid"]), 1e-4)
    folder = as_folder(tmp_path / "same", wide_a)
    assert main(["fid-ref", str(folder), "--out", str(tmp_path / "c.npz"), "--features", str(features),
                 "--crop", "8"]) == 0
    from dmdcli.utils.io import sha256

    with np.load(tmp_path / "c.npz") as f:   # which feature network made them
        assert str(f["features_sha256"]) == sha256(Path(features))
    capsys.readouterr()
    assert main(["fid", str(sa), "--ref", str(tmp_path / "c.npz"), "--features", str(features)]) == 2
    assert "c.npz was made with --crop 8, these samples with --crop 0; use the same for both" in capsys.readouterr().err
    assert main(["fid", str(sa), "--ref", str(tmp_path / "c.npz"), "--features", str(features), "--crop", "-1"]) == 2
    assert "--crop must be 0 (off) or a size in pixels, got -1" in capsys.readouterr().err
    assert main(["fid", str(sa), "--ref", str(tmp_path / "c.npz"), "--features", str(features), "--crop", "8",
                 "--json", str(tmp_path / "c.json")]) == 0
    assert abs(json.loads((tmp_path / "c.json").read_text())["fid"]) < 1e-3


def test_named_reference_checksum_is_recorded_and_checked(tmp_path, features, monkeypatch, capsys):
    """EDM publishes no checksum: the first download's sha256 is recorded beside the file and
    a changed file is refused naming both; a record is only written for what we downloaded."""
    import dmdcli.evaluation.fid as fid

    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    sa = as_samples(tmp_path / "a.safetensors", image_set(0))
    assert main(["fid-ref", str(sa), "--out", str(tmp_path / "ref.npz"), "--features", str(features),
                 "--mode", "legacy_tensorflow"]) == 0

    def fake_download(url, path, what):   # stands in for the network
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes((tmp_path / "ref.npz").read_bytes())
        return path

    monkeypatch.setattr(fid, "download", fake_download)
    assert main(["fid", str(sa), "--ref", "imagenet64", "--features", str(features)]) == 0
    cached = tmp_path / "cache" / "refs" / "imagenet-64x64.npz"
    record = cached.with_name("imagenet-64x64.npz.sha256")
    import hashlib

    assert record.read_text().strip() == hashlib.sha256(cached.read_bytes()).hexdigest()
    cached.write_bytes(cached.read_bytes() + b"x")   # corrupted later
    capsys.readouterr()
    assert main(["fid", str(sa), "--ref", "imagenet64", "--features", str(features)]) == 2
    err = capsys.readouterr().err
    assert "does not match the sha256 of 'imagenet64'" in err and "delete imagenet-64x64.npz and " \
        "imagenet-64x64.npz.sha256 to download it again" in err


@pytest.mark.parametrize("source", ["tensor", "folder"])
def test_feature_progress_counts_only_batches_through_the_network(features, tmp_path, source):
    from rich.progress import Progress

    from dmdcli.evaluation.fid import folder_features, image_features

    model, seen = torch.jit.load(str(features)), []
    with Progress(disable=True) as progress:
        def network(x):
            seen.append(progress.tasks[0].completed)
            return model(x)
        cpu = torch.device("cpu")
        feats = image_features(image_set(0), network, "clean", cpu, batch_size=16, progress=progress) \
            if source == "tensor" else \
            folder_features(as_folder(tmp_path / "f", image_set(0)), network, "clean", cpu, 16, progress=progress)
        assert seen == [0, 16, 32] and progress.tasks[0].completed == progress.tasks[0].total == 40
    assert feats.shape == (40, 16)


def test_few_samples_and_a_stats_only_reference_are_said_once_without_warnings(tmp_path, features, capfd):
    """10 samples in 16 feature dimensions: the covariance is singular, SciPy would warn and
    clean-fid print; `dmd fid` says so in one note instead, and why KID is missing (the
    reference holds only statistics), and with 40 samples says neither."""
    import warnings

    a = as_samples(tmp_path / "a.safetensors", image_set(0, n=10))
    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", str(as_samples(tmp_path / "b.safetensors", image_set(1, n=40))), "--out", str(ref),
                 "--features", str(features)]) == 0
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["fid", str(a), "--ref", str(ref), "--features", str(features)]) == 0
    out = capfd.readouterr()
    text = (out.out + out.err).replace("\n", " ")
    assert "note: FID on 10 samples, not more than the 16 feature dimensions: the covariance is singular" in text
    assert "note: no KID: it needs the reference's features" in text
    assert "singular product" not in text and "Warning" not in text
    big = as_samples(tmp_path / "c.safetensors", image_set(2, n=40))
    assert main(["fid", str(big), "--ref", str(tmp_path / "b.safetensors"), "--features", str(features)]) == 0
    out = capfd.readouterr()
    assert "note:" not in out.out + out.err


def test_frechet_of_a_singular_pair_is_a_number_not_a_crash():
    """Features of 10 samples in 128 dimensions (the shipped classifier's, from a compare test
    that failed on another thread count): clean-fid's square root of the covariance product has an
    imaginary part of 5.7 and it raises ValueError, which reached users as a traceback. frechet()
    retries with clean-fid's own diagonal offset (1e-6) added before the square root."""
    from pathlib import Path

    import numpy as np
    import pytest
    from cleanfid.fid import frechet_distance

    from dmdcli.evaluation.fid import frechet

    case = np.load(Path(__file__).parent / "fixtures" / "frechet-singular.npz")
    a, b = case["a"].astype(np.float64), case["b"].astype(np.float64)
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    try:   # whether the imaginary part crosses clean-fid's limit depends on BLAS and its threads
        plain = frechet_distance(*stats)
    except ValueError as e:
        assert "Imaginary component" in str(e)
        plain = None
    fid = frechet(*stats)
    assert np.isfinite(fid) and fid > 0
    if plain is not None:   # clean-fid stayed real here (a fresh clone's make test, 2026-12-07): no retry
        assert fid == plain
        return
    offset = np.eye(128) * 1e-6
    assert fid == pytest.approx(frechet_distance(stats[0], stats[1] + offset, stats[2], stats[3] + offset))
