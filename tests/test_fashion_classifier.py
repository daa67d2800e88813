"""The shipped Fashion-MNIST classifier (bench/fashion_classifier.py made it): FID features
and class-accuracy judge for the offline benchmark."""

import pytest
import torch

from dmdcli.datasets import load_images
from dmdcli.fid import SHIPPED_FEATURES


@pytest.fixture(scope="module")
def classifier():
    return torch.jit.load(str(SHIPPED_FEATURES["fashion"])).eval()


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
