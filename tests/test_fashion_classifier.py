"""The shipped Fashion-MNIST classifier (bench/fashion_classifier.py made it): FID features
and class-accuracy judge for the offline benchmark, as safetensors weights of
dmdcli.evaluation.fashion_classifier."""

import pytest
import torch

from dmdcli.datasets import load_images
from dmdcli.evaluation.fid import SHIPPED_FEATURES


@pytest.fixture(scope="module")
def classifier():
    from dmdcli.evaluation.fid import feature_model

    return feature_model("fashion", "clean", torch.device("cpu"))


@pytest.mark.parametrize("size", [0, 32])   # as stored (28x28), and the padded 32x32 frame students make
def test_classifier_reaches_its_stated_accuracy(classifier, size):
    x, y, _ = load_images("fashion-mnist", "test", size, limit=1000)
    with torch.no_grad():
        pred = classifier.classify((x + 1) * 127.5).argmax(1)
    assert (pred == y).float().mean().item() >= 0.92
    assert SHIPPED_FEATURES["fashion"].stat().st_size < 4 * 2**20


def test_classifier_takes_clean_fids_inputs(classifier):
    """clean-fid resizes each image to 299x299 (its "clean" mode) and passes 3-channel float
    images in [0, 255]: 128-d features come back, and the test images are still classified."""
    import numpy as np
    from cleanfid.resize import build_resizer

    x, y, _ = load_images("fashion-mnist", "test", 32, limit=200)
    resize = build_resizer("clean")
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    big = torch.from_numpy(np.stack([resize(im) for im in uint8])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert classifier(big).shape == (200, 128)
        assert (classifier.classify(big).argmax(1) == y).float().mean().item() >= 0.9


def test_classifier_loads_without_a_warning():
    """The default features are a module of the package and safetensors weights: no
    TorchScript, whose loader prints a deprecation warning on every `dmd fid`."""
    import warnings

    from dmdcli.evaluation.fid import feature_model

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = feature_model("fashion", "clean", torch.device("cpu"))
    assert type(model).__name__ == "FashionClassifier" and not model.training


def test_shipped_reference_statistics_fit_the_test_split_and_the_shipped_classifier():
    """`--ref fashion-mnist` (the 10K test split, made by `dmd fid-ref` with the shipped
    classifier, whose sha256 it records): the mean feature of a 1,000-image slice of the test
    split lies within 5 standard errors of the shipped mean in every live dimension,
    its variances agree (within 10% for the median dimension), and the dimensions the classifier never uses are 0 in both."""
    import numpy as np

    from dmdcli.evaluation.fid import SHIPPED_REFERENCES, feature_model, image_features

    from dmdcli.evaluation.fid import SHIPPED_FEATURES
    from dmdcli.utils.io import sha256

    with np.load(SHIPPED_REFERENCES["fashion-mnist"]["file"]) as f:
        mu, sigma, count, features = f["mu"], f["sigma"], int(f["count"]), str(f["features"])
        made_by = str(f["features_sha256"])
    assert (count, features, mu.shape) == (10000, "fashion", (128,))
    assert made_by == sha256(SHIPPED_FEATURES["fashion"]), "statistics of another classifier: rerun dmd fid-ref"
    model = feature_model("fashion", "clean", torch.device("cpu"))

    def feats(split: str):
        x, _, _ = load_images("fashion-mnist", split, 32, limit=1000)
        return image_features(((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1), model, "clean",
                              torch.device("cpu"), 100)

    test = feats("test")
    live = np.diag(sigma) > 1e-8
    assert 64 < live.sum() < 128 and np.all(test[:, ~live] == 0) and np.all(mu[~live] == 0)
    stderr = np.sqrt(np.diag(sigma)[live] / len(test))
    assert np.max(np.abs(test.mean(0)[live] - mu[live]) / stderr) < 5
    ratio = test.var(0, ddof=1)[live] / np.diag(sigma)[live]
    assert np.median(np.abs(ratio - 1)) < 0.1   # not every one: sparse ReLU features have heavy tails


def test_shipped_reference_needs_its_own_features(tmp_path, capsys):
    from tiny_models import save_tiny_unet2d

    from dmdcli.cli import main

    teacher, samples = save_tiny_unet2d(tmp_path / "teacher"), tmp_path / "s"
    assert main(["sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={teacher}", "--num", "4",
                 "--teacher-steps", "1", "--out", str(samples)]) == 0
    capsys.readouterr()
    assert main(["fid", str(samples), "--ref", "fashion-mnist"]) == 2
    assert ("reference 'fashion-mnist' holds statistics of the 'fashion' features, not 'inception'; add "
            "--features fashion") in capsys.readouterr().err.replace("\n", "")
    # Before any sampling: `fid --from` and `compare` refuse with nothing generated or written.
    assert main(["fid", "--from", str(tmp_path / "no-run-needed"), "--ref", "fashion-mnist"]) == 2
    assert main(["compare", str(tmp_path / "no-run-needed"), "--out", str(tmp_path / "c"),
                 "--ref", "fashion-mnist"]) == 2
    assert capsys.readouterr().err.count("holds statistics of the 'fashion' features") == 2
    assert not (tmp_path / "c").exists()
