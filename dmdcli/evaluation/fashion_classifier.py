"""The Fashion-MNIST classifier shipped as FID features and class-accuracy judge of the
offline benchmark (`--features fashion`; bench/fashion_classifier.py trains it). Its weights
are dmdcli/assets/fashion-classifier.safetensors, loaded into this module: no TorchScript.

It follows clean-fid's feature-network convention: forward(x) takes float images in [0, 255],
shape (B, 3, H, W), and returns 128-d penultimate features; classify(x) returns the 10 logits.
A 28x28 input is a Fashion-MNIST image as stored; any other size is the 32x32 frame the
teacher and students make (28x28 padded by 2 pixels of background), possibly resized
(clean-fid passes 299x299): it is resized to 32x32 and its central 28x28 taken, which
recovers a padded test image exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).parent.parent / "assets" / "fashion-classifier.safetensors"


class FashionClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 255] images, 1 or 3 channels, 28x28 or the padded 32x32 frame at any size ->
        normalised 28x28 gray."""
        x = x.float().mean(dim=1, keepdim=True)
        if x.shape[-1] != 28 or x.shape[-2] != 28:
            if x.shape[-1] != 32 or x.shape[-2] != 32:
                x = F.adaptive_avg_pool2d(x, (32, 32))   # interpolate(mode="area")
            x = x[:, :, 2:30, 2:30]
        return x / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(x)))


def load_fashion_classifier(path: Path = WEIGHTS, device: torch.device | str = "cpu") -> FashionClassifier:
    from safetensors.torch import load_file

    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
