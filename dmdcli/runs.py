"""Finding a run's recipe and newest valid checkpoint, loading its student (from a run, one
of its checkpoints, or a folder written by `dmd export` for an edm run, the shipped student
included), and starting a new run from a checkpoint (train.init_from)."""

from __future__ import annotations

import json
import tomllib
from functools import partial
from pathlib import Path

from safetensors.torch import load_file

from . import sharding
from .utils import checkpoint
from .teachers import hub
from .utils.errors import UserError
from .recipe import from_dict
from .teachers import build_teacher, make_student


def exported_student(path: Path) -> dict | None:
    """The student block of a dmd-edm/1 folder written by `dmd export` (with its recipe.toml),
    else None."""
    config = path / "config.json"
    if not ((path / "recipe.toml").is_file() and (path / "model.safetensors").is_file() and config.is_file()):
        return None
    try:
        return json.loads(config.read_text()).get("student")
    except (ValueError, AttributeError):
        return None


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or one of its checkpoints; for an
    exported student (or a shipped one by name, hub.SHIPPED_STUDENTS) the folder twice."""
    path = Path(path)
    if not path.exists() and str(path) in hub.SHIPPED_STUDENTS:
        path = hub.SHIPPED_STUDENTS[str(path)]
    if exported_student(path) is not None:
        return path, path
    if not path.exists():
        raise UserError(f"no run or checkpoint at {path}; give a run folder made by `dmd distill`")
    if (path / "manifest.json").is_file() and path.parent.name == "checkpoints":
        problem = checkpoint.verify(path)
        if problem:
            raise UserError(f"checkpoint {path} is unusable: {problem}")
        return path.parent.parent, path
    if not (path / "recipe.toml").is_file():
        raise UserError(f"{path} is not a run folder (no recipe.toml); give a folder made by `dmd distill`")
    ckpt = checkpoint.latest_valid(path)
    if ckpt is None:
        raise UserError(f"run {path} has no valid checkpoint yet; run `dmd distill {path}/recipe.toml` first")
    return path, ckpt


def load_recipe_of(path: str | Path):
    """The resolved recipe saved beside a run (or a checkpoint's run)."""
    run_dir, _ = resolve(path)
    return from_dict(tomllib.loads((run_dir / "recipe.toml").read_text()))


def load_student(path: str | Path, device=None, ema: bool = True, teacher=None):
    """(recipe, teacher, generator in eval mode, step) of a run or checkpoint; the generator's
    EMA weights when the run kept them (train.ema_decay > 0) unless ema is False. `teacher`:
    one already built from the same teacher settings, to share between runs."""
    if device is None:   # this process's device (one GPU per process under accelerate launch)
        from .utils.processes import process_state

        device = process_state().device
    run_dir, ckpt = resolve(path)
    recipe = from_dict(tomllib.loads((run_dir / "recipe.toml").read_text()))
    teacher = teacher or build_teacher(recipe.teacher).to(device)
    generator = make_student(teacher, recipe)
    exported = exported_student(ckpt)
    if exported is not None:   # the network's weights alone (float16 in the shipped student)
        generator.model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        return recipe, teacher, generator.to(device).eval(), int(exported.get("checkpoint_step", 0))
    weights = ckpt / "generator_ema.safetensors"
    if not (ema and weights.is_file()):
        weights = ckpt / "generator.safetensors"
    generator.load_state_dict(load_file(str(weights)))
    return recipe, teacher, generator.to(device).eval(), checkpoint.step_of(ckpt)


def init_from(trainer, source: Path) -> str:
    """Start this (new) run's networks from another run's checkpoint (train.init_from):
    the generator whole (the EMA weights where that run kept them), the critic's tensors
    whose names and shapes match (a GAN head is new when that run had none). Returns a
    line saying what was read."""
    if not source.exists() and str(source) in hub.SHIPPED_STUDENTS:
        source = hub.SHIPPED_STUDENTS[str(source)]
    exported = exported_student(source) is not None
    ckpt = source if exported or (source / "generator.safetensors").is_file() else \
        checkpoint.newest_for_all(source) if source.is_dir() else None
    if ckpt is None:
        raise UserError(f"train.init_from = {str(source)!r} holds no checkpoint; give a `dmd distill` run "
                        f"folder with checkpoints/, one of its checkpoints/step-* folders, or a student "
                        f"written by `dmd export`")
    gen_file = ckpt / ("model.safetensors" if exported else "generator_ema.safetensors")
    gen_file = gen_file if gen_file.is_file() else ckpt / "generator.safetensors"
    generator = trainer.acc.unwrap_model(trainer.generator)
    # Sharded networks (train.sharding) take whole state dicts through torch's scatter.
    load = partial(sharding.load_state_dict, broadcast=False) if trainer.sharded else \
        (lambda net, state, strict=True: net.load_state_dict(state, strict=strict))
    try:
        state = load_file(str(gen_file))
        if exported:   # the generator's network alone, float16 in the shipped student: cast to ours
            own = generator.state_dict()
            state = {f"model.{k}": v.to(own[f"model.{k}"].dtype) if f"model.{k}" in own else v
                     for k, v in state.items()}
        load(generator, state)
    except RuntimeError as e:
        raise UserError(f"train.init_from: {gen_file} does not fit this recipe's generator "
                        f"({str(e).splitlines()[-1].strip()[:200]}); start from a run of the same teacher "
                        f"and student settings") from None
    critic = trainer.acc.unwrap_model(trainer.critic)
    own = critic.state_dict()
    plain = (lambda k: k.removeprefix("critic."))
    # An exported student has no critic: the critic stays the teacher's copy, as in a fresh run.
    theirs = {} if exported else \
        {plain(k): v for k, v in load_file(str(ckpt / "critic.safetensors")).items()}
    matched = {k: theirs[plain(k)] for k in own if plain(k) in theirs and theirs[plain(k)].shape == own[k].shape}
    load(critic, matched, strict=False)
    if trainer.ema is not None:   # the EMA starts at the loaded weights
        trainer.ema.shadow_params = [p.detach().clone() for p in generator.parameters()]
    if trainer.critic_ema is not None:
        net = critic.critic if trainer.gan else critic
        trainer.critic_ema.load_state_dict(net.state_dict())
    return (f"initialised from {ckpt}: generator from {gen_file.name}, critic {len(matched)} of {len(own)} "
            f"tensors")
