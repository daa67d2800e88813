"""The teacher interface every DMD component talks to (the registry is the package's
__init__, so that no teacher module imports another).

Whatever its noise family, a teacher answers one question (SPEC section 1):
`x0_hat = denoise(x_t, t, cond, guidance)`. It also says how to make the two trainable
networks (the one-step generator and the critic, i.e. the fake score) and how to encode
conditions. The DMD math never sees more than that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..losses import classifier_free_guidance


class Teacher(ABC):
    name: str
    family: str              # "vp", "edm" or "flow"
    schedule: object          # VPSchedule, EDMSchedule or FlowSchedule
    sample_shape: tuple[int, ...]
    num_classes: int | None   # None: unconditional
    device = torch.device("cpu")
    preview_limit: int | None = None   # at most this many samples in a preview picture
    preview_batch: int | None = None   # generate previews in batches of this size
    default_sampler = "ddim"            # for make-pairs and sample when none is given

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond, guidance: float = 1.0) -> torch.Tensor:
        """The real score as an x0 prediction; guidance in the standard CFG form (1 = none)."""

    @abstractmethod
    def make_generator(self) -> nn.Module:
        """The student: a network `net(x_t, t, cond) -> raw` with a `prediction_type` attribute."""

    @abstractmethod
    def make_critic(self) -> nn.Module:
        """The fake score, same calling convention as the generator."""

    def random_labels(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=generator.device)

    def condition_ids(self, indices) -> torch.Tensor | None:
        """Conditions of pair indices, assigned by global index (i % classes) so that several
        ranks never repeat one order."""
        if not self.num_classes:
            return None
        return torch.as_tensor(list(indices), dtype=torch.long) % self.num_classes

    def release_trainable(self) -> None:
        """Free the fp32 weights a network teacher keeps to make its generator and critic (3.4 GB
        for SD1.5 on every rank's CPU), once both are made; later copies are refused."""
        if getattr(self, "_trainable", None) is not None:
            self._trainable = None

    def check_guidance(self, guidance: float) -> None:
        """Raise a UserError where this teacher cannot be guided at this scale."""

    def encode_condition(self, labels: torch.Tensor | None):
        """Labels (or prompts, for text teachers) to what the networks take as `cond`."""
        return labels

    def to(self, device: torch.device) -> "Teacher":
        return self

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples to images in [-1, 1]; latent teachers decode them."""
        return x

    def images_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Samples to images on their device, differentiable (for a loss on decoded images)."""
        return x

    @abstractmethod
    def describe(self) -> dict:
        """Everything that identifies this teacher, for manifests and run records."""

    def save_preview(self, student: torch.Tensor, teacher: torch.Tensor | None,
                     labels: torch.Tensor | None, path: Path, title: str = "") -> None:
        """Write a picture of samples (PNG) for people to look at."""


def uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 pixels (values outside are clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def real_score(teacher: Teacher, x_t: torch.Tensor, t: torch.Tensor, cond, guidance: float,
               interval=(0, 999)) -> torch.Tensor:
    """The teacher's x0 prediction, guided only where interval[0] <= t <= interval[1]
    (Kynkaanniemi et al. 2024): elsewhere the conditional prediction, guidance 1."""
    teacher.check_guidance(guidance)
    inside = (t >= interval[0]) & (t <= interval[1])
    if guidance == 1.0 or bool(inside.all()):
        return teacher.denoise(x_t, t, cond, guidance)
    x0 = teacher.denoise(x_t, t, cond, 1.0)
    if bool(inside.any()):   # only the unconditional prediction is missing there (cond None: unconditional)
        i = inside.nonzero().squeeze(1)
        uncond = teacher.denoise(x_t[i], t[i], None, 1.0)
        x0[i] = classifier_free_guidance(uncond, x0[i], guidance).to(x0.dtype)
    return x0


def resolve_dtype(name: str) -> torch.dtype:
    """A recipe's dtype name; "auto" is bf16 on CUDA cards that have it (the authors' choice),
    fp16 on older cards (inference only: the frozen teacher), else fp32."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_student(teacher: Teacher, recipe) -> nn.Module:
    """The generator, its output read as student.prediction_type (the teacher's by default),
    with LoRA adapters when train.lora_rank > 0."""
    student_cfg = recipe.student
    generator = teacher.make_generator()
    if recipe.train.lora_rank:
        from ..networks import add_lora

        add_lora(generator, recipe.train.lora_rank)
    from ..utils.errors import UserError

    if teacher.family == "edm" and student_cfg.prediction_type not in ("teacher", "sample"):
        raise UserError(f"student.prediction_type = {student_cfg.prediction_type!r}: EDM networks output x0 "
                        f"through their preconditioning; use 'teacher' (or 'sample')")
    # Flow: epsilon divides by 1 - sigma, infinite at the top timestep; v is VP's.
    if teacher.family == "flow" and student_cfg.prediction_type not in ("teacher", "sample", "flow"):
        raise UserError(f"student.prediction_type = {student_cfg.prediction_type!r}: a flow teacher's student "
                        f"predicts the velocity ('teacher' or 'flow') or x0 ('sample')")
    if teacher.family != "flow" and student_cfg.prediction_type == "flow":
        raise UserError(f"student.prediction_type = 'flow' needs a flow-matching teacher; the {teacher.name} "
                        f"teacher's noise is {teacher.family}")
    if student_cfg.prediction_type != "teacher":
        generator.prediction_type = student_cfg.prediction_type
    return generator
