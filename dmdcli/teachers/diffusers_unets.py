"""Teachers from diffusers models: Stable Diffusion (`sd`, text-conditioned latents) and
pixel-space UNet2DModel (`unet2d`, optionally class-conditional with a null class; DDPM-style
or, with a FlowMatchEulerDiscreteScheduler beside it, a rectified-flow model).

The real score is the frozen teacher UNet; the generator and the critic start as trainable
fp32 copies of it (SPEC section 6), the generator fed at the conditioning timestep.
Guidance is the standard form pred_u + s (pred_c - pred_u), applied to the UNet's own
prediction (epsilon or v; both are affine in x0 at a fixed x_t, so this equals CFG on eps).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch

from . import hub
from ..utils.errors import UserError
from ..losses import classifier_free_guidance
from ..networks import UNetDenoiser
from ..schedules import FlowSchedule, VPSchedule
from .base import Teacher, resolve_dtype


def is_flow(scheduler_config) -> bool:
    """A flow-matching scheduler's config (FlowMatchEulerDiscreteScheduler, or the
    FlowMatchLCMScheduler of an exported flow student): the model predicts the velocity."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


class _SchedulerConfig:
    """hub.load's way to a scheduler folder's raw config (its _class_name included)."""

    @staticmethod
    def from_pretrained(path, subfolder=None, **kwargs):
        from diffusers import DDPMScheduler

        return DDPMScheduler.load_config(path, subfolder=subfolder, **kwargs)


class UNetTeacher(Teacher):
    """What SD and pixel UNet teachers share: CFG around a frozen UNet, trainable copies, grids."""

    family = "vp"
    conditional = False
    denoiser = UNetDenoiser   # the wrapper of the diffusers network (SD3: TransformerDenoiser)
    preview_limit = 64
    preview_batch = 16

    def _setup(self, unet, scheduler_config: dict, dtype: torch.dtype, null_class: int | None = None):
        self.scheduler_config = dict(scheduler_config)
        if is_flow(self.scheduler_config):
            if self.scheduler_config.get("use_dynamic_shifting"):
                raise UserError("the teacher's FlowMatchEulerDiscreteScheduler uses dynamic shifting (its shift "
                                "depends on the image size); give it a fixed shift (use_dynamic_shifting = false)")
            self.schedule = FlowSchedule(self.scheduler_config)
            self.prediction_type, self.family, self.default_sampler = "flow", "flow", "euler"
        else:
            self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise UserError(f"teacher scheduler has prediction_type {self.prediction_type!r}; "
                                f"supported: epsilon, v_prediction, sample")
            self.schedule = VPSchedule.from_scheduler_config(self.scheduler_config)
        # Flow networks read sigma * T: every copy carries the table (UNetDenoiser).
        self._model_timesteps = self.schedule.sigmas * self.schedule.num_train_timesteps \
            if self.family == "flow" else None
        self._trainable = unet.float()   # kept for copies; the frozen real score is cast below
        real = copy.deepcopy(unet)
        self.real = self.denoiser((real.to(dtype) if dtype != torch.float32 else real).eval().requires_grad_(False),
                                 self.prediction_type, null_class, self._model_timesteps)
        self.null_class = null_class
        self.dtype = dtype
        self.device = torch.device("cpu")

    def _copy(self) -> UNetDenoiser:
        if self._trainable is None:
            raise RuntimeError("the teacher's trainable weights were released (release_trainable)")
        net = self.denoiser(copy.deepcopy(self._trainable).float().train().requires_grad_(True),
                           self.prediction_type, self.null_class, self._model_timesteps)
        return net

    make_generator = _copy
    make_critic = _copy

    def null_condition(self, n: int):
        raise NotImplementedError

    def _guided(self, net, x_t, t, cond, guidance: float):
        """net's prediction (the teacher's own parametrisation) under standard CFG."""
        if cond is None and self.conditional:
            cond = self.null_condition(len(x_t))
        if guidance == 1.0 or not self.conditional:
            return net(x_t, t, cond).float()
        uncond = self.null_condition(len(x_t))
        both = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).float()
        pred_u, pred_c = both.chunk(2)
        return classifier_free_guidance(pred_u, pred_c, guidance)

    @torch.no_grad()
    def denoise(self, x_t, t, cond, guidance: float = 1.0):
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        pred = self._guided(self.real, x_t, t, cond, guidance)
        return self.schedule.to_x0(pred, x_t.float(), t, self.prediction_type)

    @torch.no_grad()
    def denoise_sigma(self, x_t, sigma, cond, guidance: float = 1.0):
        """Flow teachers: x0 at a sigma of their Euler sampler, off the training table."""
        model_t = torch.full((len(x_t),), float(sigma) * self.schedule.num_train_timesteps, device=x_t.device)
        v = self._guided(self.real.call, x_t, model_t, cond, guidance)
        return x_t.float() - float(sigma) * v

    def to(self, device):
        self.device = torch.device(device)
        self.real.to(device)
        return self

    def save_preview(self, student, teacher, labels, path: Path, title: str = "") -> None:
        from ..evaluation.plots import class_grid

        class_grid(student, teacher, self.num_classes, self.to_images, path)


class SDTeacher(UNetTeacher):
    """Stable Diffusion: latents with the VAE's scaling factor, CLIP text embeddings."""

    name = "sd"
    conditional = True

    def __init__(self, cfg):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.cfg = cfg
        self.model = hub.resolve(cfg.model)
        dtype = resolve_dtype(cfg.dtype)
        unet = hub.load(UNet2DConditionModel, cfg.model, "unet", cfg.revision)
        if unet.config.addition_embed_type is not None:
            raise UserError(f"{cfg.model} looks like SDXL (its UNet needs added conditions) but is not an SDXL "
                            f"pipeline folder (no model_index.json naming text_encoder_2); give the whole pipeline")
        scheduler_config = dict(hub.load(DDPMScheduler, cfg.model, "scheduler", cfg.revision).config)
        self.vae = hub.load(AutoencoderKL, cfg.model, "vae", cfg.revision, torch_dtype=dtype).eval()
        self.vae.requires_grad_(False)
        self.text_encoder = hub.load(CLIPTextModel, cfg.model, "text_encoder", cfg.revision, torch_dtype=dtype).eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = hub.load(CLIPTokenizer, cfg.model, "tokenizer", cfg.revision)
        if unet.config.in_channels != self.vae.config.latent_channels:
            raise UserError(f"{cfg.model}: the UNet takes {unet.config.in_channels} channels, the VAE makes "
                            f"{self.vae.config.latent_channels} (an inpainting model?); give a text-to-image model")
        self._latent_setup(unet, scheduler_config, dtype)

    def _latent_setup(self, net, scheduler_config: dict, dtype: torch.dtype) -> None:
        """What every latent text teacher sets once its parts are loaded: the frozen real score,
        the sample shape at the recipe's resolution, the prompts."""
        self._setup(net, scheduler_config, dtype)
        size = net.config.sample_size if not self.cfg.resolution else self.cfg.resolution // self.vae_scale_factor
        self.sample_shape = (net.config.in_channels, size, size)
        self.num_classes = None
        self.prompts = self._read_prompts(self.cfg.prompts)
        self._empty, self._prompt_ids = None, None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @staticmethod
    def _read_prompts(spec: str) -> list[str]:
        """A text file (one prompt a line) or a Hub/local dataset as NAME[:column]."""
        if not spec:
            return []
        p = Path(spec)
        if p.is_file():
            prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        elif p.suffix in (".txt", ".csv") or "/" not in spec or p.is_absolute():
            raise UserError(f"prompts file not found: {spec} (teacher.sd.prompts: a text file, one prompt "
                            f"per line, or a dataset as NAME[:column])")
        else:
            from ..datasets import load_text_column

            prompts = [t.strip() for t in load_text_column(spec) if t and t.strip()]
        if not prompts:
            raise UserError(f"prompts {spec} hold no prompt")
        return prompts

    def to(self, device):
        super().to(device)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):   # those the model has
            if getattr(self, name, None) is not None:
                getattr(self, name).to(device)
        self._empty = None
        self._prompt_ids = self._prompt_ids.to(device) if self._prompt_ids is not None else None
        return self

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """The texts' CLIP token ids, padded to the tokeniser's length, as int32 on the CPU."""
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.int()

    def prompt_ids(self) -> torch.Tensor:
        """Every prompt's token ids (int32, on the teacher's device), tokenised once: a batch's
        conditions are then indexed on the device, without the host."""
        if self._prompt_ids is None:
            self._prompt_ids = torch.cat([self.token_ids(self.prompts[i:i + 4096])
                                          for i in range(0, len(self.prompts), 4096)]).to(self.device)
        return self._prompt_ids

    def random_labels(self, n, generator):
        if not self.prompts:
            raise UserError("the sd teacher needs training prompts: set teacher.sd.prompts to a text file "
                            "with one prompt per line")
        return torch.randint(0, len(self.prompts), (n,), generator=generator, device=generator.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.token_ids(texts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (from token_ids) to the text encoder's embeddings, on the teacher's device."""
        return self.text_encoder(ids.to(self.device).long())[0]

    def condition_ids(self, indices):
        if not self.prompts:
            raise UserError("the sd teacher needs prompts: set teacher.sd.prompts to a text file "
                            "with one prompt per line")
        return torch.as_tensor(list(indices), dtype=torch.long) % len(self.prompts)

    @torch.no_grad()
    def encode_condition(self, labels):
        """Prompt indices to text embeddings, computed once per batch for all three networks."""
        ids = self.prompt_ids()
        return self.encode_ids(ids[labels.to(ids.device)])

    def null_condition(self, n: int):
        if self._empty is None:
            self._empty = self.encode_text([""])   # SD's unconditional: the empty prompt
        return self._empty.expand(n, -1, -1)

    def _vae_shift(self) -> float:
        return self.vae.config.get("shift_factor") or 0.0   # SD3's VAE has one; SD 1.x/2.x's none

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the latents the teacher denoises (the VAE's mean, shifted and scaled)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(x.to(self.device, vae_dtype)).latent_dist.mean
        return (z - self._vae_shift()) * self.vae.config.scaling_factor

    @torch.no_grad()
    def to_images(self, x, chunk: int = 8):
        """Decode latents in chunks (a 512-px decode of many latents at once needs tens of GB)."""
        return torch.cat([self.images_with_grad(part.to(self.device)).clamp(-1, 1).cpu() for part in x.split(chunk)])

    def images_with_grad(self, x):
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(x.to(vae_dtype) / self.vae.config.scaling_factor + self._vae_shift()).sample.float()

    def describe(self) -> dict:
        import hashlib

        prompts = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()
        return {"name": self.name, "model": self.model, "revision": self.cfg.revision, "prompts_sha256": prompts,
                "scheduler": self.scheduler_config, "sample_shape": list(self.sample_shape)}


class UNet2DTeacher(UNetTeacher):
    """A pixel-space UNet2DModel; class-conditional when it has class embeddings, the last
    of which is the null class used for guidance."""

    name = "unet2d"

    def __init__(self, cfg):
        from diffusers import DDPMScheduler, UNet2DModel

        self.cfg = cfg
        if not cfg.model:
            raise UserError("teacher.unet2d.model is empty: give a diffusers folder with unet/ and scheduler/")
        folder = Path(hub.resolve(cfg.model))
        pipeline_style = (folder / "unet").is_dir()
        unet = hub.load(UNet2DModel, cfg.model, "unet" if pipeline_style else None, cfg.revision)
        raw = hub.load(_SchedulerConfig, cfg.model, "scheduler", cfg.revision)
        scheduler_config = dict(raw) if is_flow(raw) else \
            dict(hub.load(DDPMScheduler, cfg.model, "scheduler", cfg.revision).config)
        embeds = unet.config.num_class_embeds
        self.num_classes = (embeds - 1) if embeds else None
        self.conditional = bool(embeds)
        self._setup(unet, scheduler_config, resolve_dtype(cfg.dtype), null_class=self.num_classes)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, *size)

    def null_condition(self, n: int):
        return torch.full((n,), self.null_class, device=self.device, dtype=torch.long)

    def describe(self) -> dict:
        # The resolved dtype, not the recipe's word for it: "auto" and "float32" are one teacher on a CPU.
        return {"name": self.name, **asdict(self.cfg), "dtype": str(self.dtype).removeprefix("torch."),
                "scheduler": self.scheduler_config, "sample_shape": list(self.sample_shape)}
