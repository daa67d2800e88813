"""`dmd compare`: one or more students against their shared teacher at several step counts,
measured the same way (the same noise and conditions by global index, the same features and
reference), as a table, a JSON report and a PNG grid of the students over the teacher for the
same noise. Each finished row is kept in its folder (row.json); a rerun reuses the rows whose
settings, checkpoint weights included, are unchanged, so a long comparison resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.errors import UserError
from .samples import load_samples
from ..utils.io import write_json

if TYPE_CHECKING:
    import torch

ROW_FILE = "row.json"


def compare(runs, out: Path, num: int, teacher_steps: list[int], ref: str, features: str = "inception",
            mode: str = "clean", seed: int = 0, batch_size: int = 256, sampler: str | None = None,
            progress=None, clip: str | None = None) -> list[dict]:
    """One row per student, then one per teacher step count. Each row: who, steps, images per
    second, FID (+ KID, class accuracy where available; CLIP score with a CLIP model). `progress` (a rich Progress) shows
    each row's sampling. The teacher is built once; each student is loaded for its row."""
    from .fid import check_reference_features
    from ..utils.processes import folder_in_use, one_process_only, process_state
    from ..recipe import to_dict
    from ..runs import load_recipe_of
    from ..teachers import build_teacher

    one_process_only("compare", "run `dmd sample` for each student and the teacher, then `dmd fid` on each folder")
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if num <= 0 or batch_size <= 0 or not runs or not teacher_steps or min(teacher_steps) < 1:
        raise UserError(f"--num and --batch-size must be positive and --teacher-steps a list of step counts "
                        f">= 1, got {num}, {batch_size} and {teacher_steps}")
    check_reference_features(ref, features)
    recipes = [load_recipe_of(run) for run in runs]
    recipe = recipes[0]
    for run, other in zip(runs[1:], recipes[1:]):
        mine, theirs = to_dict(recipe)["teacher"], to_dict(other)["teacher"]
        if theirs != mine:
            key = next(k for k in mine if mine[k] != theirs[k])
            raise UserError(f"{run} distils another teacher or guidance than {runs[0]} (teacher.{key}: "
                            f"{theirs[key]!r} against {mine[key]!r}); compare runs of one teacher together")
    teacher = build_teacher(recipe.teacher).to(process_state().device)
    if len(teacher.sample_shape) != 3:
        raise UserError(f"compare measures image students; {runs[0]}'s teacher ({teacher.name}) makes vectors: "
                        f"use `dmd sample` and `dmd fid --ref gmm`")
    if clip and not getattr(teacher, "prompts", None):
        raise UserError(f"--clip measures text-to-image students against their captions; {runs[0]}'s teacher "
                        f"({teacher.name}) has no prompts")
    sampler = sampler or teacher.default_sampler
    out = Path(out)
    with folder_in_use(out, "`dmd compare`", "let it finish, or choose another --out"):
        return _compare(runs, recipes, teacher, out, num, teacher_steps, ref, features, mode, seed, batch_size,
                        sampler, progress, clip)


def _compare(runs, recipes, teacher, out, num, teacher_steps, ref, features, mode, seed, batch_size, sampler,
             progress, clip) -> list[dict]:
    from .generate import make_samples, teacher_identity, weights_digest
    from .plots import class_grid
    from ..runs import load_student

    guidance = recipes[0].teacher.guidance
    common = {"num": num, "seed": seed, "batch_size": batch_size, "mode": mode, "teacher": teacher_identity(teacher),
              "ref": _identity(ref), "features": _identity(features), **({"clip": clip} if clip else {})}
    rows, students_x, teacher_x = [], [], None
    for name, run, run_recipe in zip(_folder_names(runs), runs, recipes):
        _, _, generator, step = load_student(run, teacher=teacher)
        source = f"student {run} step {step}"
        key = {**common, "who": "student", "source": source, "timesteps": list(run_recipe.student.timesteps),
               "weights": weights_digest(generator), "precision": run_recipe.train.mixed_precision}
        row, x = _row(out / name, key, ref, features, progress, lambda folder: make_samples(
            folder, num, teacher, generator=generator, timesteps=run_recipe.student.timesteps,
            precision=run_recipe.train.mixed_precision,
            teacher_steps=0, seed=seed, batch_size=batch_size, student_source=source, progress=progress)["student"])
        rows.append({"who": "student", "steps": len(run_recipe.student.timesteps), "run": str(run),
                     "checkpoint_step": step, **row})
        students_x.append(x)
        generator = None   # freed before the next run's student loads
    for steps in sorted(set(teacher_steps)):
        key = {**common, "who": "teacher", "steps": steps, "sampler": sampler, "guidance": guidance}
        row, teacher_x = _row(out / f"teacher-{steps}", key, ref, features, progress, lambda folder: make_samples(
            folder, num, teacher, teacher_steps=steps, guidance=guidance, sampler=sampler, seed=seed,
            batch_size=batch_size, progress=progress)["teacher"])
        rows.append({"who": "teacher", "steps": steps, **row, "sampler": sampler, "guidance": guidance})
    class_grid(students_x, teacher_x, teacher.num_classes, teacher.to_images, out / "grid.png")
    write_json(out / "compare.json", {"runs": [str(r) for r in runs], "rows": rows})
    return rows


def _identity(name: str) -> str:
    """A reference or feature network by name, or by its file's SHA-256 when it is a file."""
    from ..utils.io import sha256

    return f"{name} sha256:{sha256(Path(name))}" if Path(name).is_file() else name


def _row(folder: Path, key: dict, ref: str, features: str, progress, sample) -> tuple[dict, "torch.Tensor"]:
    """(row, samples) of one sampler setting: the kept row when its key matches and its
    samples are there, else sampled (sample(folder) -> (x, rate, steps)) and measured afresh.
    row.json is written twice: with the key and rate once the samples are written, with the
    row once they are measured, so a call stopped during FID measures the kept samples."""
    from .fid import fid_report

    earlier = False
    try:
        kept = json.loads((folder / ROW_FILE).read_text())
        if kept.get("key") == json.loads(json.dumps(key)):
            tensors, _ = load_samples(folder)
            if len(tensors["x"]) != key["num"]:
                raise ValueError("another sample set is there")
            if "row" in kept:
                return {**kept["row"], "resumed": True}, tensors["x"]
            x, rate, earlier = tensors["x"], kept["images_per_second"], True   # sampled, not yet measured
    except (OSError, ValueError, UserError, AttributeError, KeyError, TypeError):   # none, or unreadable: make it
        pass
    if not earlier:
        (folder / ROW_FILE).unlink(missing_ok=True)   # its samples are about to be replaced
        x, rate, _ = sample(folder)
        write_json(folder / ROW_FILE, {"key": key, "images_per_second": rate})
    tensors, meta = load_samples(folder)
    report = fid_report(tensors, ref, features, key["mode"], batch_size=min(key["batch_size"], 256),
                        progress=progress)
    row = {"images_per_second": rate, "fid": report["fid"], "kid": report.get("kid"),
           "class_accuracy": report.get("class_accuracy"), "within_class_spread": report["within_class_spread"],
           "num_samples": report["num_samples"], "reference": report["reference"], "features": report["features"],
           "sampler": None, "guidance": None, "notes": report.get("notes", [])}
    if "clip" in key:
        from .clip_score import captions_of, clip_score
        from .fid import to_uint8_images

        row["clip_score"] = clip_score(to_uint8_images(tensors), captions_of(tensors, meta),
                                       key["clip"], min(key["batch_size"], 256), progress)
    write_json(folder / ROW_FILE, {"key": key, "images_per_second": rate, "row": row})
    return {**row, "resumed": earlier}, x   # resumed: its samples and images/s come from an earlier call


def _folder_names(runs) -> list[str]:
    """`student` for one run; `student-NAME` (the run's folder name, or its checkpoint's) for several."""
    if len(runs) == 1:
        return ["student"]
    names = [f"student-{Path(r).resolve().name}" for r in runs]
    return names if len(set(names)) == len(names) else [f"student-{i}-{Path(r).resolve().name}"
                                                        for i, r in enumerate(runs)]


def speedup(rows: list[dict]) -> float | None:
    """The first student's images per second over the teacher's at its most steps."""
    student = next((r for r in rows if r["who"] == "student"), None)
    teachers = [r for r in rows if r["who"] == "teacher"]
    if student is None or not teachers:
        return None
    slowest = max(teachers, key=lambda r: r["steps"])["images_per_second"]
    return None if student["images_per_second"] is None or not slowest else student["images_per_second"] / slowest


def rows_for_table(rows: list[dict]) -> list[list[str]]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def who(r):
        if r["who"] == "teacher":
            return f"teacher ({r['steps']} step{'s' if r['steps'] > 1 else ''}, {r['sampler']}, guidance {r['guidance']})"
        name = Path(r["run"]).name
        return f"student{'' if name == 'student' else ' ' + name} ({r['steps']} step{'s' if r['steps'] > 1 else ''})"

    clip = any("clip_score" in r for r in rows)
    return [[who(r) + (" *" if r.get("resumed") else ""), num(r["fid"], ".3f"), num(r["kid"], ".5f"),
             num(r["class_accuracy"], ".3f"), num(r.get("within_class_spread"), ".3f"),
             *([num(r.get("clip_score"), ".2f")] if clip else []), num(r["images_per_second"], ",.1f")] for r in rows]
