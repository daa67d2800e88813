"""Why the Fashion-MNIST proof moved from a DDPM epsilon teacher to an EDM one (issue 24): one
figure of both set-ups on the same noise and classes.

Usage: .venv/bin/python bench/teacher_setups.py [--num 100] [--out docs/fashion-teacher-setups.png] [--edm DIR]

Rows of the picture, one class a column: for each teacher, what a one-step generator made
from it draws before any distillation (the DDPM teacher read at t = 999, epsilon output; the
EDM teacher at sigma 80, input z * 80, as the authors' ImageNet-64 generator), then the
teacher's own sampler (DDIM 50 steps; Heun 18 steps, 35 network calls). Beside it, the factor
by which each parametrisation multiplies its network's output error into the x0 estimate:
sigma for epsilon prediction (157 at t = 999 on DDPM's linear schedule), c_out = sigma
sigma_data / sqrt(sigma^2 + sigma_data^2) for EDM (at most sigma_data = 0.5).
"""

import argparse
from pathlib import Path

import torch

from dmdcli.recipe import EDMConfig, UNet2DConfig
from dmdcli.sampling import student_sample, teacher_ode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("docs/fashion-teacher-setups.png"))
    ap.add_argument("--edm", default="fashion-mnist", help="the EDM teacher (default: the shipped one)")
    a = ap.parse_args()
    from dmdcli.teachers.diffusers_unets import UNet2DTeacher
    from dmdcli.teachers.edm import EDMTeacher

    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.num, 1, 32, 32, generator=g)
    labels = torch.arange(a.num) % 10
    blocks = []
    vp = UNet2DTeacher(UNet2DConfig(model="fashion-mnist", dtype="float32"))
    edm = EDMTeacher(EDMConfig(model=a.edm, dtype="float32"))
    with torch.no_grad():
        for teacher, t_in, steps, sampler in ((vp, 999, 50, "ddim"), (edm, 999, 18, "heun")):
            blocks.append(student_sample(teacher.real, teacher.schedule, z, labels, [t_in]))
            blocks.append(teacher_ode(teacher, z, labels, steps, 1.0, sampler))
    _figure(blocks, vp, a.out)
    print(f"wrote {a.out}")


def _figure(blocks: list, vp, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    from dmdcli.utils.io import atomic_path

    fig = plt.figure(figsize=(15, 7.5))
    names = ["DDPM epsilon: the generator at t = 999", "DDPM epsilon: DDIM, 50 steps",
             "EDM: the generator at sigma 80", "EDM: Heun, 18 steps"]
    for k, (name, block) in enumerate(zip(names, blocks)):
        ax = fig.add_subplot(2, 4, (k // 2) * 4 + k % 2 + 1)
        grid = make_grid((block.clamp(-1, 1) + 1) / 2, nrow=10, padding=2)
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    ax1 = fig.add_subplot(1, 2, 2)
    a = vp.schedule.alphas_cumprod
    sigma_vp = ((1 - a) / a).sqrt()
    sigmas = torch.logspace(-3, 2.3, 200, dtype=torch.float64)
    ax1.loglog(sigma_vp, sigma_vp, label="epsilon prediction (x0 error = sigma x epsilon error)")
    ax1.loglog(sigmas, sigmas * 0.5 / (sigmas ** 2 + 0.25).sqrt(), label="EDM: c_out(sigma), at most 0.5")
    for t in (600, 999):
        ax1.plot([float(sigma_vp[t])], [float(sigma_vp[t])], "o", color="C0")
        ax1.annotate(f"DDPM t = {t}: {float(sigma_vp[t]):.1f}", (float(sigma_vp[t]), float(sigma_vp[t])),
                     textcoords="offset points", xytext=(-120, 5), fontsize=8)
    ax1.plot([80.0], [80 * 0.5 / (80 ** 2 + 0.25) ** 0.5], "o", color="C1")
    ax1.annotate("EDM sigma 80: 0.50", (80.0, 0.5), textcoords="offset points", xytext=(-70, -15), fontsize=8)
    ax1.set_xlabel("noise level sigma")
    ax1.set_ylabel("x0 error per unit of network output error")
    ax1.legend(fontsize=8, loc="upper left")
    ax1.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
