"""`dmd distill`: the run around the DMD step (dmdcli/trainer.py). One command per run
folder (a lock), resume from the newest valid checkpoint, logs, checkpoints and previews on
schedule, a clean stop on Ctrl-C or SIGTERM.

To resume, run the same command again: training continues bitwise as if never stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from accelerate import Accelerator

from .utils import checkpoint
from .utils.errors import UserError
from .utils.io import write_text
from .utils.processes import folder_in_use
from .recipe import Recipe, dotted, from_dict, to_dict, to_toml
from .runs import init_from
from .utils.stopping import StopRequest, Stopped
from .trainer import DMDTrainer, make_accelerator

# Keys that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {("train", "steps"), ("run", "checkpoint_every"), ("run", "keep_checkpoints"),
                     ("run", "log_every"), ("run", "preview_samples"), ("run", "log_with"),
                     ("train", "gradient_checkpointing")}


def check_same_run(run_dir: Path, recipe) -> None:
    """Refuse to resume a run folder with a recipe that differs in a key that matters."""
    saved = run_dir / "recipe.toml"
    if not saved.is_file():
        return
    import tomllib

    old, new = to_dict(from_dict(tomllib.loads(saved.read_text()), type(recipe))), to_dict(recipe)
    for section in new:
        for key in new[section]:
            # Under a decay the schedule's length is train.steps: another length bends the curve.
            resumable = (section, key) in RESUMABLE_CHANGES and not (
                (section, key) == ("train", "steps") and new["train"].get("lr_decay_steps"))   # (teacher recipes have none)
            if not resumable and old[section][key] != new[section][key]:
                raise UserError(f"{run_dir} holds a run with a different recipe ({section}.{key}: "
                                f"{old[section][key]!r} there, {new[section][key]!r} now); to start a new "
                                f"run use another folder, e.g. --set run.out={run_dir}-2")


def distill(recipe: Recipe, progress_factory=None, console=None) -> Path:
    """Run (or resume) a distillation; returns the run folder."""
    run_dir = Path(recipe.run.out)
    acc = make_accelerator(recipe)
    # One command per run folder: a second one (another terminal, a resubmitted job) would
    # interleave checkpoints and metrics with the first. Taken before any model is loaded.
    with folder_in_use(run_dir, "`dmd distill`", "let it finish or stop it, then run the same command again"):
        return _distill(recipe, acc, run_dir, progress_factory, console)


def _distill(recipe: Recipe, acc: Accelerator, run_dir: Path, progress_factory, console) -> Path:
    check_same_run(run_dir, recipe)
    trainer = DMDTrainer(recipe, acc)
    if acc.is_main_process:
        write_text(run_dir / "recipe.toml", to_toml(recipe))
    last = checkpoint.newest_for_all(run_dir)
    if last is not None:
        trainer.load(last)
        if console and acc.is_main_process:
            console.print(f"resuming {run_dir} from {last.name}")
    elif recipe.train.init_from:
        said = init_from(trainer, Path(recipe.train.init_from))
        if console and acc.is_main_process:
            console.print(said)
    metrics_path = run_dir / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_metrics(metrics_path, trainer.step)
    total = recipe.train.steps
    if trainer.step >= total:
        if console and acc.is_main_process:
            console.print(f"{run_dir} is already complete at step {trainer.step}")
        return run_dir
    if recipe.run.log_with != "none":   # TensorBoard: runs/NAME/logs/; wandb: project "dmd", run NAME
        # purge_step: a resumed run drops the events logged past its checkpoint, as metrics.jsonl does.
        acc.init_trackers("logs" if recipe.run.log_with == "tensorboard" else "dmd", config=_flat(recipe),
                          init_kwargs={"wandb": {"name": run_dir.name},
                                       "tensorboard": {"purge_step": trainer.step} if trainer.step else {}})
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.time()
    progress = progress_factory() if (progress_factory and acc.is_main_process) else None
    try:
        with progress or contextlib.nullcontext(), StopRequest() as stop:
            task = progress.add_task("distill", total=total, completed=trainer.step, losses="") if progress else None
            while trainer.step < total:
                trainer.stop_requested = stop.requested
                logs = trainer.train_step()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                step = trainer.step
                at_checkpoint = step % recipe.run.checkpoint_every == 0 or step == total
                # Log windows also close at checkpoints, so a resumed run logs the same windows.
                if step % recipe.run.log_every == 0 or at_checkpoint:
                    means = _window_means(sums, counts)
                    means.update(step=step, lr_generator=trainer.sched_g.get_last_lr()[0], seconds=time.time() - t0)
                    if acc.is_main_process:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(means) + "\n")
                    acc.log({k: v for k, v in means.items() if k != "step"}, step=step)
                    losses = "  ".join(f"{k[5:]} {means[k]:.4f}" for k in sorted(means) if k.startswith("loss_"))
                    if progress:
                        progress.update(task, losses=losses)
                    sums, counts = {}, {}
                if progress:
                    progress.update(task, completed=step)
                stopping = trainer.stopping   # any process's request, read with the finite check
                if at_checkpoint or stopping:
                    trainer.save()
                    trainer.preview(f"step-{step:08d}")
                if stopping:
                    raise Stopped(stop.signum or 15, f"stopped at step {step} with a checkpoint; "
                                                     f"run the same command again to resume")
    finally:   # flush the trackers however the run ends
        acc.end_training()
    return run_dir


def _window_means(sums: dict, counts: dict) -> dict[str, float]:
    """The log window's means (sums for the skip counters), read from the device in one sync."""
    import torch

    keys = sorted(sums)
    device = next((v.device for v in sums.values() if isinstance(v, torch.Tensor)), "cpu")
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                          / (1 if k.startswith("skipped") else counts[k]) for k in keys]).tolist()
    return dict(zip(keys, values))


def _flat(recipe: Recipe) -> dict:
    """The recipe as dotted key -> scalar, for the trackers' hyperparameters."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dotted(to_dict(recipe)).items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from, so the log reads as one run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line half-written by a killed run
    write_text(path, "".join(line + "\n" for line in keep))

