"""Stable Diffusion 3 and 3.5 (the `sd` teacher on an SD3 folder): a rectified-flow MMDiT
(SD3Transformer2DModel) on VAE latents, with three text encoders (CLIP-L and CLIP-G, whose
pooled outputs make the pooled embedding, and T5, optional as in diffusers).

Everything an SD teacher does (prompts, CFG with the empty prompt, grids, the GAN's
captioned latents) carries over; what differs is the network (TransformerDenoiser), the
flow schedule (FlowSchedule on the folder's FlowMatchEulerDiscreteScheduler, its shift
included) and the text condition, which packs the token embeddings and the pooled one into
one tensor (networks.pack_text). The encoders are run as StableDiffusion3Pipeline.encode_prompt
runs them (a test holds the two equal); the token ids of all three tokenisers travel as one
int32 row, so captions are still tokenised once.
"""

from __future__ import annotations

import torch

from . import hub
from ..networks import TransformerDenoiser, pack_text
from ..utils.errors import UserError
from .base import resolve_dtype
from .diffusers_unets import SDTeacher, _SchedulerConfig, is_flow

T5_MAX_LENGTH = 256   # StableDiffusion3Pipeline's default max_sequence_length


def pipeline_config(model: str, revision: str = "") -> dict:
    """A diffusers folder's or Hub id's model_index.json (from the local cache when offline), or {}."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(hub.resolve(model), revision=revision or None))
    except (OSError, ValueError, EnvironmentError):
        return {}   # the SD loader then says what is missing


def is_sd3(model: str, revision: str = "") -> bool:
    """Whether a diffusers folder or Hub id is an SD3 pipeline; Flux's is refused in one line."""
    config = pipeline_config(model, revision)
    if str(config.get("_class_name", "")).startswith("Flux"):
        raise UserError(f"{model} is a Flux pipeline: Flux teachers are not supported (FLUX.1-dev is "
                        f"guidance-distilled, with no unconditional prediction for the real score's CFG; "
                        f"FLUX.1-schnell is already a few-step model); SD3 and SD3.5 folders are")
    return "transformer" in config and "text_encoder_3" in config


def has_t5(model: str) -> bool:
    """False for a local SD3 folder saved without T5 (text_encoder_3=None, as SD3 allows)."""
    from pathlib import Path

    local = Path(hub.resolve(model)).expanduser()
    return not (local.exists() and not (local / "text_encoder_3").is_dir())


class SD3Teacher(SDTeacher):
    """SD3: the `sd` teacher's prompts, CFG and latents around an SD3 transformer."""

    denoiser = TransformerDenoiser

    def __init__(self, cfg):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.cfg = cfg
        self.model = hub.resolve(cfg.model)
        dtype = resolve_dtype(cfg.dtype)
        transformer = hub.load(SD3Transformer2DModel, cfg.model, "transformer", cfg.revision)
        scheduler_config = dict(hub.load(_SchedulerConfig, cfg.model, "scheduler", cfg.revision))
        if not is_flow(scheduler_config):
            raise UserError(f"{cfg.model}: an SD3 transformer with a {scheduler_config.get('_class_name')}; SD3 "
                            f"teachers need their FlowMatchEulerDiscreteScheduler")
        self.vae = hub.load(AutoencoderKL, cfg.model, "vae", cfg.revision, torch_dtype=dtype).eval().requires_grad_(False)

        def encoder(cls, sub):
            return hub.load(cls, cfg.model, sub, cfg.revision, torch_dtype=dtype).eval().requires_grad_(False)

        # diffusers' names: CLIP-L, CLIP-G, T5 (None: SD3 without T5, a folder saved without it)
        self.text_encoder = encoder(CLIPTextModelWithProjection, "text_encoder")
        self.text_encoder_2 = encoder(CLIPTextModelWithProjection, "text_encoder_2")
        self.tokenizers = [hub.load(CLIPTokenizer, cfg.model, sub, cfg.revision) for sub in ("tokenizer", "tokenizer_2")]
        self.text_encoder_3, self.t5_tokenizer = None, None
        if has_t5(cfg.model):
            self.text_encoder_3 = encoder(T5EncoderModel, "text_encoder_3")
            self.t5_tokenizer = hub.load(T5TokenizerFast, cfg.model, "tokenizer_3", cfg.revision)
        self.joint_dim = transformer.config.joint_attention_dim
        self.t5_length = min(T5_MAX_LENGTH, self.t5_tokenizer.model_max_length) if self.t5_tokenizer else T5_MAX_LENGTH
        if transformer.config.in_channels != self.vae.config.latent_channels:
            raise UserError(f"{cfg.model}: the transformer takes {transformer.config.in_channels} channels, the VAE "
                            f"makes {self.vae.config.latent_channels}; give a text-to-image SD3 model")
        self._latent_setup(transformer, scheduler_config, dtype)

    def _lengths(self) -> list[int]:
        return [t.model_max_length for t in self.tokenizers] + ([self.t5_length] if self.text_encoder_3 else [])

    @property
    def condition_shape(self) -> tuple[int, int]:
        """The packed condition's (tokens, width): CLIP's tokens, T5's, the pooled one."""
        return self.tokenizers[0].model_max_length + self.t5_length + 1, self.joint_dim

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """The ids of the three tokenisers side by side (CLIP-L, CLIP-G, T5), int32 on the CPU."""
        parts = [tok(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
                 for tok, n in zip([*self.tokenizers, self.t5_tokenizer], self._lengths())]
        return torch.cat(parts, dim=1).int()

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (token_ids) to the packed condition, as StableDiffusion3Pipeline.encode_prompt
        makes it: CLIP penultimate states side by side, zero-padded to T5's width, T5's states
        after them; the pooled embedding the two CLIP projections."""
        parts = ids.to(self.device).long().split(self._lengths(), dim=1)
        states, pooled = [], []
        for encoder, part in zip((self.text_encoder, self.text_encoder_2), parts):
            out = encoder(part, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5 = self.text_encoder_3(parts[2])[0] if self.text_encoder_3 is not None else \
            torch.zeros(len(ids), self.t5_length, self.joint_dim, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return pack_text(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def describe(self) -> dict:
        return {**super().describe(), "kind": "sd3"}
