"""`dmd compare`: a student against its teacher at several step counts, measured the same way
(the same noise and conditions by global index, the same features and reference), as a
table, a JSON report and a PNG grid of teacher over student for the same noise."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .evaluate import load_samples


def compare(run, out: Path, num: int, teacher_steps: list[int], ref: str, features: str = "inception",
            mode: str = "clean", seed: int = 0, batch_size: int = 256, sampler: str | None = None,
            progress=None) -> list[dict]:
    """One row per sampler setting: the student first, then the teacher at each step count.
    Each row: who, steps, images per second, FID (+ KID, class accuracy where available).
    `progress` (a rich Progress) shows each row's sampling."""
    from .fid import check_reference_features, fid_report
    from .generate import make_samples
    from .plots import class_grid
    from .runs import load_student

    if num <= 0 or not teacher_steps or min(teacher_steps) < 1:
        raise UserError(f"--num must be positive and --teacher-steps a list of step counts >= 1, got {num} "
                        f"and {teacher_steps}")
    check_reference_features(ref, features)
    recipe, teacher, generator, step = load_student(run)
    if len(teacher.sample_shape) != 3:
        raise UserError(f"compare measures image students; {run}'s teacher ({teacher.name}) makes vectors: "
                        f"use `dmd sample` and `dmd fid --ref gmm`")
    sampler = sampler or teacher.default_sampler
    guidance = recipe.teacher.guidance
    out = Path(out)
    rows, made = [], {}
    settings = [("student", len(recipe.student.timesteps))] + [("teacher", k) for k in sorted(set(teacher_steps))]
    for who, steps in settings:
        folder = out / (who if who == "student" else f"teacher-{steps}")
        if who == "student":
            result = make_samples(folder, num, teacher, generator=generator, timesteps=recipe.student.timesteps,
                                  teacher_steps=0, seed=seed, batch_size=batch_size,
                                  student_source=f"student {run} step {step}", progress=progress)["student"]
        else:
            result = make_samples(folder, num, teacher, teacher_steps=steps, guidance=guidance, sampler=sampler,
                                  seed=seed, batch_size=batch_size, progress=progress)["teacher"]
        tensors, _ = load_samples(folder)
        report = fid_report(tensors, ref, features, mode, batch_size=min(batch_size, 256), progress=progress)
        made[(who, steps)] = result[0]
        rows.append({"who": who, "steps": steps, "images_per_second": result[1], "fid": report["fid"],
                     "kid": report.get("kid"), "class_accuracy": report.get("class_accuracy"),
                     "within_class_spread": report["within_class_spread"],
                     "num_samples": report["num_samples"], "reference": report["reference"],
                     "features": report["features"], "sampler": None if who == "student" else sampler,
                     "guidance": None if who == "student" else guidance})
    best = max(k for w, k in made if w == "teacher")
    class_grid(made[("student", settings[0][1])], made[("teacher", best)], teacher.num_classes,
               teacher.to_images, out / "grid.png")
    (out / "compare.json").write_text(json.dumps({"run": str(run), "checkpoint_step": step, "rows": rows},
                                                 indent=2) + "\n")
    return rows


def speedup(rows: list[dict]) -> float | None:
    """Student images per second over the teacher's at its most steps."""
    student = next((r for r in rows if r["who"] == "student"), None)
    teachers = [r for r in rows if r["who"] == "teacher"]
    if student is None or not teachers:
        return None
    return student["images_per_second"] / max(teachers, key=lambda r: r["steps"])["images_per_second"]


def rows_for_table(rows: list[dict]) -> list[list[str]]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return [[f"{r['who']} ({r['steps']} step{'s' if r['steps'] > 1 else ''}"
             + (f", {r['sampler']}, guidance {r['guidance']}" if r["who"] == "teacher" else "") + ")",
             num(r["fid"], ".3f"), num(r["kid"], ".5f"), num(r["class_accuracy"], ".3f"),
             num(r.get("within_class_spread"), ".3f"), num(r["images_per_second"], ",.1f")] for r in rows]
