"""Train the Fashion-MNIST classifier that serves as FID features and class-accuracy judge
for the offline benchmark (dmdcli.evaluation.fashion_classifier), and save its weights as safetensors.

Usage: .venv/bin/python bench/fashion_classifier.py [--epochs 6] [--out dmdcli/assets/fashion-classifier.safetensors]
       .venv/bin/python bench/fashion_classifier.py --evaluate dmdcli/assets/fashion-classifier.safetensors

dmdcli/fashion_classifier.py says what the network takes and returns.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dmdcli.evaluation.fashion_classifier import FashionClassifier, load_fashion_classifier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default="dmdcli/assets/fashion-classifier.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluate", help="only measure these weights: test accuracy as stored (28x28), "
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
    save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, a.out)
    print(f"saved {a.out}")


def evaluate(path: str) -> None:
    import numpy as np
    from cleanfid.resize import build_resizer

    from dmdcli.datasets import load_images

    model = load_fashion_classifier(path)

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
