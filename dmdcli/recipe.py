"""Recipes: TOML files validated against the dataclasses below.

Parsing is tomllib's (writing, tomli_w's); this module only checks keys and types, applies
`--set section.key=value` overrides, and resolves defaults once, so the run directory holds
the exact recipe that ran (`recipe.toml`, itself a valid recipe).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .utils.errors import UserError


def _choices(*values: str, default: str):
    return field(default=default, metadata={"choices": values})


@dataclass
class GMMConfig:
    """The exact teacher: a ring of `components` Gaussians, or explicit means/stds/weights."""
    components: int = 8    # Gaussians on the ring
    radius: float = 3.0    # the ring's radius
    std: float = 0.4       # each Gaussian's standard deviation
    dim: int = 2           # dimensions (the ring lies in the first two)
    means: list[list[float]] = field(default_factory=list)   # explicit means instead of the ring
    stds: list[float] = field(default_factory=list)          # their standard deviations
    weights: list[float] = field(default_factory=list)       # their mixture weights (default: equal)
    conditional: bool = False   # class-conditional: one class per Gaussian
    # The noise path the exact teacher is defined under: vp (SD's DDPM schedule) or flow
    # (rectified flow, x_t = (1 - s) x0 + s eps, SD3's FlowMatchEulerDiscreteScheduler).
    schedule: str = _choices("vp", "flow", default="vp")
    shift: float = 3.0     # flow only: the scheduler's timestep shift (SD3's 3.0)
    hidden: int = 256      # width of the MLP generator and critic
    layers: int = 3        # hidden layers of the MLP generator and critic


@dataclass
class SDConfig:
    """Stable Diffusion from diffusers: a local folder, a Hub id, or the alias "sd15"."""
    model: str = "sd15"        # a diffusers folder, a Hub id, or "sd15"
    revision: str = ""         # Hub revision (branch, tag or commit); "" the default branch
    prompts: str = ""          # training prompts: a text file, one per line
    resolution: int = 0        # pixels; 0: the UNet's own sample size x the VAE factor
    dtype: str = _choices("auto", "float32", "bfloat16", "float16", default="auto")   # the frozen teacher's; auto: bf16 on CUDA


@dataclass
class UNet2DConfig:
    """A diffusers UNet2DModel folder (unet/ and scheduler/, or the model folder itself
    with a scheduler/ beside its config)."""
    model: str = ""            # the folder, a Hub id, or "fashion-mnist" (the shipped teacher)
    revision: str = ""         # Hub revision; "" the default branch
    dtype: str = _choices("auto", "float32", "bfloat16", "float16", default="auto")   # the frozen teacher's; auto: bf16 on CUDA


@dataclass
class EDMConfig:
    """An EDM network converted by `dmd convert-teacher` (a folder: config.json, model.safetensors)."""
    model: str = ""            # the folder, or "fashion-mnist" (the shipped EDM teacher)
    dtype: str = _choices("auto", "float32", "bfloat16", default="auto")   # the frozen teacher's; auto: bf16 on CUDA
    dropout: float = 0.0       # dropout of the generator and critic copies (the teacher runs without)


@dataclass
class TeacherConfig:
    name: str = "gmm"          # gmm (exact mixture), sd, unet2d or edm
    # Real-score guidance in the standard form eps_u + s (eps_c - eps_u); 1 = none.
    guidance: float = 1.0
    # Timesteps [first, last] at which the real score is guided; elsewhere it is the plain
    # conditional score (guidance in a limited interval, Kynkaanniemi et al. 2024).
    guidance_interval: list[int] = field(default_factory=lambda: [0, 999])
    gmm: GMMConfig = field(default_factory=GMMConfig)
    sd: SDConfig = field(default_factory=SDConfig)
    unet2d: UNet2DConfig = field(default_factory=UNet2DConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)


@dataclass
class RunConfig:
    out: str = ""              # default: runs/<recipe file stem>
    seed: int = 0              # initialisation, noise, timesteps and data order all follow it
    checkpoint_every: int = 500   # iterations between checkpoints (and previews)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    log_every: int = 50        # iterations per line of metrics.jsonl (means over the window)
    preview_samples: int = 2000   # student samples drawn into previews/ at each checkpoint; 0: none
    log_with: str = _choices("tensorboard", "wandb", "none", default="tensorboard")   # also metrics.jsonl


@dataclass
class StudentConfig:
    # Conditioning timesteps of the generator; [999] is one step.
    timesteps: list[int] = field(default_factory=lambda: [999])
    # What the generator's network outputs: the teacher's own parametrisation (the papers'),
    # or "sample" (x0 directly) for teachers whose last alpha_bar is tiny (DDPM's linear
    # schedule: sqrt(alpha_bar_999) = 0.006, so an epsilon output's error is amplified 160x).
    prediction_type: str = _choices("teacher", "sample", "epsilon", "v_prediction", "flow", default="teacher")


@dataclass
class TrainConfig:
    method: str = _choices("dmd2", "dmd", default="dmd2")   # dmd: DMD v1 (needs regression.pairs)
    steps: int = 10000                  # iterations; the critic steps on every one
    batch_size: int = 64                # per process
    critic_steps_per_generator_step: int = 5   # DMD2's two time-scale rule; 1 for DMD v1
    critic_warmup_steps: int = 0        # critic-only iterations before the generator moves
    lr_generator: float = 2e-6          # AdamW learning rate of the generator
    lr_critic: float = 2e-6             # AdamW learning rate of the critic (fake score) and GAN head
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])   # AdamW betas of both
    weight_decay: float = 0.01          # AdamW weight decay of both
    warmup_steps: int = 500             # linear learning-rate warm-up, in iterations (the generator's from its first turn)
    lr_decay_steps: int = 0             # > 0: both rates fall linearly to zero over the run's last this many iterations
    grad_clip: float = 10.0             # gradient norm clip of both networks; 0: off
    dm_weight: float = 1.0              # weight of the distribution-matching loss
    mixed_precision: str = _choices("no", "bf16", "fp16", default="no")   # accelerate's autocast (the authors: bf16)
    on_non_finite: str = _choices("stop", "skip", default="stop")   # skip: drop the update, count it
    lora_rank: int = 0                  # > 0: train LoRA adapters of this rank (peft) on frozen UNets
    gradient_checkpointing: bool = False   # recompute activations in backward: less memory, ~30% slower
    # "fsdp2": generator and critic sharded over the processes of `accelerate launch --multi_gpu`
    # (FSDP2, one unit per block; checkpoints still whole); "none": DDP replicas.
    sharding: str = _choices("none", "fsdp2", default="none")
    ema_decay: float = 0.0              # EMA of the generator (diffusers' EMAModel); 0: off, as the authors
    # The DM loss's timesteps, uniform in [first, last] (the papers': 0.02 T to 0.98 T). An
    # epsilon teacher's x0 error grows with sigma: where sigma is far above the data's, the
    # critic's x0 minus the teacher's is mostly error (bench/critic_fit.py).
    dm_timesteps: list[int] = field(default_factory=lambda: [20, 980])
    # > 0: the DM loss reads the fake score from an EMA of the critic's weights (decay per critic
    # step); the critic itself trains on unchanged. 0: off, as the papers.
    critic_ema_decay: float = 0.0
    # A new run's generator (and its critic, where names and shapes match) start from another
    # run's newest checkpoint (its EMA generator where it kept one) or from one checkpoint
    # folder, or from a student written by `dmd export` (the shipped fashion-mnist-dmd2 too; the
    # critic then starts from the teacher); read once, when the run has no checkpoint of its own.
    # "Regress, then DMD2" (the authors' SDXL 1-step) and SD1.5's stage two (GAN on real images)
    # are two commands.
    init_from: str = ""


@dataclass
class RegressionConfig:
    """DMD v1's loss on teacher ODE pairs made by `dmd make-pairs`; under dmd2 it adds to the
    generator's loss as well (recipes/toy2d.toml)."""
    pairs: str = ""                     # a folder made by `dmd make-pairs`
    weight: float = 0.25                # the paper's lambda_reg
    # "lpips" is the paper's (on decoded images, upsampled to 224) and needs lpips_weights.
    distance: str = _choices("mse", "pseudo_huber", "lpips", default="mse")
    batch_size: int = 0                 # 0: the training batch size
    lpips_weights: str = ""             # a file made by `dmd convert-lpips`


@dataclass
class GANConfig:
    """DMD2's GAN loss on the critic's bottleneck (SPEC section 5); both weights 0: no GAN."""
    generator_weight: float = 0.0      # ImageNet 3e-3, SD1.5 1e-3, SDXL 5e-3
    critic_weight: float = 0.0         # 1e-2 when on; above 1e-2 destabilises the critic
    dataset: str = ""                  # real images; "" for the gmm teacher (its exact samples)


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    gan: GANConfig = field(default_factory=GANConfig)


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"     # or imagefolder:PATH, or a Hub dataset with image/label
    image_size: int = 32               # pixels (Fashion-MNIST's 28 is padded with background)
    limit: int = 0                     # use only the first N images (0: all)


@dataclass
class UNetModelConfig:
    # vp (a UNet2DModel, DDPM linear schedule, epsilon loss: the `unet2d` teacher) or edm (EDM's
    # ADM network, preconditioning, log-normal sigmas and loss weighting: the `edm` teacher, as
    # EDM's ImageNet-64 model). For edm the channels are model_channels * channel_mult, so each
    # must be a multiple of the first.
    family: str = _choices("vp", "edm", default="vp")
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])   # channels per resolution
    layers_per_block: int = 1          # residual blocks per resolution
    attention_at_lowest: bool = True   # self-attention at the lowest resolution
    dropout: float = 0.0               # edm only (the vp UNet2DModel has none)


@dataclass
class TeacherTrainConfig:
    steps: int = 5000                  # optimiser steps
    batch_size: int = 64               # images per step
    lr: float = 2e-4                   # AdamW learning rate
    warmup_steps: int = 200            # linear learning-rate warm-up, in steps
    grad_clip: float = 1.0             # gradient norm clip; 0: off
    weight_decay: float = 0.0          # AdamW weight decay
    ema_decay: float = 0.999           # EMA of the weights (the teacher saved is the EMA)
    class_dropout: float = 0.1         # share of labels replaced by the null class (for CFG)
    # edm only: training sigmas are log-normal, ln sigma ~ N(p_mean, p_std^2) (EDM's CIFAR-10 values).
    p_mean: float = -1.2               # mean of ln sigma
    p_std: float = 1.2                 # standard deviation of ln sigma


@dataclass
class TeacherRecipe:
    """`dmd train-teacher`: a class-conditional diffusion teacher (vp or edm) trained on an image dataset."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_value(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"recipe key '{key}' must be a list, got {value!r}")
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"recipe key '{key}' must be {_TYPE_NAMES.get(tp, tp.__name__)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"recipe key '{prefix.rstrip('.')}' must be a table (section)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise UserError(f"unknown recipe key '{prefix}{unknown[0]}' (known keys in {where}: "
                        f"{', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        kwargs[name] = _check_value(value, tp, key)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"recipe key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.steps=100' -> (['train', 'steps'], 100); values are TOML, or else a plain string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_recipe(path: str | Path, overrides: list[str] = (), schema=None):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path} (see recipes/ for examples)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    recipe = recipe_from_data(data, overrides, schema or Recipe)
    if not recipe.run.out:
        recipe.run.out = str(Path("runs") / path.stem)
    return recipe


def recipe_from_data(data: dict, overrides: list[str] = (), schema=None):
    """A validated recipe from TOML data plus `--set` overrides."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    recipe = _build(schema or Recipe, data)
    if isinstance(recipe, Recipe):
        validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """Checks across keys, each naming the key at fault."""
    positive = {"train.steps": r.train.steps, "train.batch_size": r.train.batch_size,
                "train.critic_steps_per_generator_step": r.train.critic_steps_per_generator_step,
                "train.lr_generator": r.train.lr_generator, "train.lr_critic": r.train.lr_critic,
                "run.checkpoint_every": r.run.checkpoint_every, "run.log_every": r.run.log_every,
                "teacher.gmm.hidden": r.teacher.gmm.hidden, "teacher.gmm.layers": r.teacher.gmm.layers,
                "teacher.gmm.dim": r.teacher.gmm.dim}
    for key, v in positive.items():
        if v <= 0:
            raise UserError(f"recipe key '{key}' must be positive, got {v}")
    not_negative = {"train.critic_warmup_steps": r.train.critic_warmup_steps, "train.warmup_steps":
                    r.train.warmup_steps, "train.weight_decay": r.train.weight_decay, "train.grad_clip":
                    r.train.grad_clip, "run.preview_samples": r.run.preview_samples, "run.keep_checkpoints":
                    r.run.keep_checkpoints, "regression.batch_size": r.regression.batch_size,
                    "regression.weight": r.regression.weight, "gan.generator_weight": r.gan.generator_weight,
                    "gan.critic_weight": r.gan.critic_weight, "train.lora_rank": r.train.lora_rank,
                    "train.ema_decay": r.train.ema_decay, "train.critic_ema_decay": r.train.critic_ema_decay,
                    "train.lr_decay_steps": r.train.lr_decay_steps}
    for key, v in not_negative.items():
        if v < 0:
            raise UserError(f"recipe key '{key}' must not be negative, got {v}")
    for key in ("ema_decay", "critic_ema_decay"):
        if getattr(r.train, key) >= 1:
            raise UserError(f"recipe key 'train.{key}' must be below 1 (0: off), got {getattr(r.train, key)}")
    t = r.train
    if t.lr_decay_steps and t.warmup_steps + t.lr_decay_steps > t.steps - t.critic_warmup_steps:
        raise UserError(f"recipe key 'train.lr_decay_steps' ({t.lr_decay_steps}) plus train.warmup_steps "
                        f"({t.warmup_steps}) must fit in the generator's {t.steps - t.critic_warmup_steps} "
                        f"iterations (train.steps minus train.critic_warmup_steps)")
    if len(r.train.betas) != 2:
        raise UserError(f"recipe key 'train.betas' must have two numbers, got {r.train.betas}")
    ts = r.student.timesteps
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or not all(0 <= t <= 999 for t in ts):
        raise UserError(f"recipe key 'student.timesteps' must be a non-empty, strictly descending list "
                        f"of timesteps in 0..999, e.g. [999] or [999, 749, 499, 249]; got {ts}")
    for key, value, example in (("teacher.guidance_interval", r.teacher.guidance_interval, "[0, 999] (guide everywhere)"),
                                ("train.dm_timesteps", r.train.dm_timesteps, "[20, 980] (the papers')")):
        if len(value) != 2 or not 0 <= value[0] <= value[1] <= 999:
            raise UserError(f"recipe key '{key}' must be two timesteps [first, last] with "
                            f"0 <= first <= last <= 999, e.g. {example}; got {value}")
    if r.regression.distance == "lpips" and not r.regression.lpips_weights:
        raise UserError("regression.distance = 'lpips' needs regression.lpips_weights = FILE, made by `dmd "
                        "convert-lpips` from torchvision's VGG16 weights; without them use 'pseudo_huber' or 'mse'")
    if r.train.method == "dmd" and not r.regression.pairs:
        raise UserError("train.method = 'dmd' needs regression pairs: set regression.pairs to a folder "
                        "made by `dmd make-pairs`")


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dotted(tree: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys: {"gmm": {"radius": 5}} -> {"gmm.radius": 5}."""
    out = {}
    for key, value in tree.items():
        out.update(dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def to_toml(recipe) -> str:
    return tomli_w.dumps(to_dict(recipe))


def from_dict(data: dict, schema=None):
    return _build(schema or Recipe, data)
