"""Train the Fashion-MNIST classifier that serves as FID features and class-accuracy judge
for the offline benchmark, and save it as TorchScript.

Usage: .venv/bin/python bench/fashion_classifier.py [--epochs 6] [--out dmdcli/assets/fashion-classifier.pt]
       .venv/bin/python bench/fashion_classifier.py --evaluate dmdcli/assets/fashion-classifier.pt

The saved module follows clean-fid's feature-network convention: forward(x) takes float
images in [0, 255], shape (B, 3, H, W), and returns 128-d penultimate features; classify(x)
returns the 10 logits. A 28x28 input is a Fashion-MNIST image as stored; any other size is
the 32x32 frame the teacher and students make (28x28 padded by 2 pixels of background),
possibly resized (clean-fid passes 299x299): it is resized to 32x32 and its central 28x28
taken, which recovers a padded test image exactly.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


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
                # interpolate(mode="area") is this op, but scripting interpolate compiles all of its
                # modes, and torch 2.14's include an op (lanczos) that older torch cannot load.
                x = F.adaptive_avg_pool2d(x, (32, 32))
            x = x[:, :, 2:30, 2:30]
        return x / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))

    @torch.jit.export
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(x)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default="dmdcli/assets/fashion-classifier.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluate", help="only measure this TorchScript file: test accuracy as stored (28x28), "
                                       "on the padded 32x32 frame, and on that frame resized by clean-fid to 299")
    a = ap.parse_args()
    if a.evaluate:
        return evaluate(a.evaluate)
    from dmdcli.datasets import load_images

    torch.manual_seed(a.seed)
    train_x, train_y, _ = load_images("fashion-mnist", "train", 0)
    test_x, test_y, _ = load_images("fashion-mnist", "test", 0)
    to255 = lambda x: (x + 1) * 127.5   # noqa: E731
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = a.epochs * (len(train_x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(perm) - 127, 128):
            idx = perm[i:i + 128]
            x = to255(train_x[idx])
            flip = torch.rand(len(x), generator=g) < 0.5   # horizontal flips keep the class
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model.classify(x), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model.classify(to255(test_x[i:i + 1000])).argmax(1) for i in range(0, len(test_x), 1000)])
        print(f"epoch {epoch + 1}: test accuracy {(pred == test_y).float().mean():.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    scripted = torch.jit.script(model.eval())
    scripted.save(a.out)
    print(f"saved {a.out}")


def evaluate(path: str) -> None:
    import numpy as np
    from cleanfid.resize import build_resizer

    from dmdcli.datasets import load_images

    model = torch.jit.load(path).eval()

    def accuracy(x, y):
        with torch.no_grad():
            pred = torch.cat([model.classify(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        return (pred == y).float().mean().item()

    for size, label in ((0, "28x28 as stored"), (32, "padded 32x32 frame")):
        x, y, _ = load_images("fashion-mnist", "test", size)
        print(f"{label:36s} {accuracy((x + 1) * 127.5, y):.4f}  (10,000 test images)")
    x, y, _ = load_images("fashion-mnist", "test", 32, limit=1000)
    resize = build_resizer("clean")
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    big = torch.from_numpy(np.stack([resize(im) for im in uint8])).permute(0, 3, 1, 2).float()
    print(f"{'32x32 frame, clean-fid resize to 299':36s} {accuracy(big, y):.4f}  (first 1,000 test images)")


if __name__ == "__main__":
    main()
