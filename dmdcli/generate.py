"""Making sample sets from a student run or from a teacher: batches, timing, files.

The noise of sample i is a pure function of (seed, i) and its condition is assigned by
global index (class i % classes, prompt i % prompts), so any subset can be regenerated
and several ranks never repeat one order.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .evaluate import SAMPLES_FILE, save_samples
from .pairs import pair_noise
from .sampling import student_sample, teacher_ode


def _batched(fn, num: int, batch_size: int, teacher, seed: int):
    """fn(noise, cond, idx) over batches; noise and conditions are functions of the index."""
    parts, t0 = [], time.perf_counter()
    for start in range(0, num, batch_size):
        idx = range(start, min(start + batch_size, num))
        labels = teacher.condition_ids(idx)
        z = pair_noise(seed, idx, teacher.sample_shape).to(getattr(teacher, "device", "cpu"))
        cond = teacher.encode_condition(labels.to(z.device) if labels is not None else None)
        parts.append(fn(z, cond, idx).cpu())
    return torch.cat(parts), num / (time.perf_counter() - t0)


def make_samples(out: Path, num: int, teacher, *, generator=None, timesteps=(999,), student_source: str = "",
                 teacher_steps: int = 50, guidance: float = 1.0, sampler: str = "ddim", seed: int = 0,
                 batch_size: int = 256) -> dict:
    """Write samples.safetensors (the student's, or the teacher's when there is no student),
    teacher.safetensors beside a student's when teacher_steps > 0, and samples.png.
    Returns {who: (samples, samples per second, steps)}."""
    results = {}
    if generator is not None:
        def student(z, c, idx):   # few-step students re-noise with per-index noise too
            renoise = [pair_noise(seed + 7919 * (k + 1), idx, teacher.sample_shape) for k in range(len(timesteps) - 1)]
            return student_sample(generator, teacher.schedule, z, c, list(timesteps), renoise=renoise)

        x, rate = _batched(student, num, batch_size, teacher, seed)
        results["student"] = (x, rate, len(timesteps))
    if teacher_steps:
        x, rate = _batched(lambda z, c, idx: teacher_ode(teacher, z, c, teacher_steps, guidance, sampler),
                           num, batch_size, teacher, seed)
        results["teacher"] = (x, rate, teacher_steps)
    labels = teacher.condition_ids(range(num))
    out.mkdir(parents=True, exist_ok=True)

    def decoded(x):   # latent teachers: keep the images too, for FID
        if not hasattr(teacher, "vae"):
            return None
        return ((teacher.to_images(x).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    teacher_source = f"teacher {sampler} {teacher_steps} steps, guidance {guidance}"
    if "student" in results:
        save_samples(out / SAMPLES_FILE, results["student"][0], labels, teacher.describe(), student_source,
                     decoded(results["student"][0]))
        if "teacher" in results:
            save_samples(out / "teacher.safetensors", results["teacher"][0], labels, teacher.describe(),
                         teacher_source, decoded(results["teacher"][0]))
    else:
        save_samples(out / SAMPLES_FILE, results["teacher"][0], labels, teacher.describe(), teacher_source,
                     decoded(results["teacher"][0]))
    main = results.get("student", results.get("teacher"))[0]
    other = results["teacher"][0] if "student" in results and "teacher" in results else None
    teacher.save_preview(main, other, labels, out / "samples.png", title=student_source or teacher_source)
    return results
