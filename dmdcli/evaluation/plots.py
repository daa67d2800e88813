"""Pictures people would rather see than read: scatter panels for vector teachers."""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.io import atomic_path


def scatter_panels(panels: list[tuple[str, torch.Tensor]], centres: torch.Tensor | None,
                   path: Path, title: str = "", max_points: int = 5000) -> None:
    """One scatter per (name, samples) panel, first two coordinates, shared limits; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    pts = [p[:max_points, :2].double().cpu() for _, p in panels]
    lim = max(float(torch.cat(pts).abs().quantile(0.995)), 1.0) * 1.1
    for ax, (name, _), p in zip(axes[0], panels, pts):
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35, linewidths=0)
        if centres is not None:
            ax.scatter(centres[:, 0], centres[:, 1], marker="x", c="red", s=30)
        ax.set_title(name)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Images in [-1, 1], (N, C, H, W), as one PNG grid."""
    from torchvision.utils import make_grid

    grid = make_grid(((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), nrow=nrow, padding=2)
    from PIL import Image

    arr = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")


def class_grid(student: torch.Tensor | list[torch.Tensor], teacher: torch.Tensor | None, num_classes: int | None,
               to_images, path: Path) -> None:
    """Up to 100 samples, one column per class (conditions go by global index, i % classes),
    with the teacher's block for the same noise below the student's (or below each student's
    block in turn, given a list of students); PNG."""
    students = list(student) if isinstance(student, (list, tuple)) else [student]
    nrow = min(num_classes or 8, min(len(s) for s in students))
    n = max(nrow, min(len(students[0]), 100) // nrow * nrow)
    blocks = [to_images(s[:n]) for s in students] + ([to_images(teacher[:n])] if teacher is not None else [])
    image_grid(torch.cat(blocks), path, nrow=nrow)
