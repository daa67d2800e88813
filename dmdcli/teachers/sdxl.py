"""Stable Diffusion XL (the `sd` teacher on an SDXL folder): a UNet with added conditions
("text_time": the pooled text embedding and six size numbers), two CLIP text encoders whose
penultimate states are laid side by side, and a VAE that overflows in float16.

As for SD3 (sd3.py), the condition is one tensor: the token embeddings (B, 77, 2048) and one
more token holding the pooled embedding (1280) then the add_time_ids (original size, crop
top-left, target size: the resolution, 0, 0, the resolution, as the pipeline makes them for
an uncropped square image), zero-padded. The text encoders run as
StableDiffusionXLPipeline.encode_prompt runs them (a test holds the two equal), and the
unconditional prediction is the pipeline's: zeros where the folder's model_index says
force_zeros_for_empty_prompt (SDXL base does), else the empty prompt.
"""

from __future__ import annotations

import torch

from . import hub
from ..networks import UNetDenoiser, pack_text
from ..utils.errors import UserError
from .base import resolve_dtype
from .diffusers_unets import SDTeacher


class SDXLDenoiser(UNetDenoiser):
    """An SDXL UNet in our convention: `cond` packs the tokens and [pooled, time ids]."""

    def call(self, x_t: torch.Tensor, model_t: torch.Tensor, cond=None) -> torch.Tensor:
        dtype, config = self.unet.dtype, self.unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = cond[:, -1].to(dtype)
        return self.unet(x_t.to(dtype), model_t, encoder_hidden_states=cond[:, :-1].to(dtype),
                         added_cond_kwargs={"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled:pooled + 6]}
                         ).sample


def is_sdxl(config: dict) -> bool:
    """Whether a model_index.json (sd3.pipeline_config) is an SDXL text-to-image pipeline's."""
    return "text_encoder_2" in config and "unet" in config


class SDXLTeacher(SDTeacher):
    """SDXL: the `sd` teacher's prompts, CFG and latents around an SDXL UNet."""

    denoiser = SDXLDenoiser

    def __init__(self, cfg, pipeline_config: dict):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.cfg = cfg
        self.model = hub.resolve(cfg.model)
        dtype = resolve_dtype(cfg.dtype)
        unet = hub.load(UNet2DConditionModel, cfg.model, "unet", cfg.revision)
        if unet.config.addition_embed_type != "text_time":
            raise UserError(f"{cfg.model}: an SDXL pipeline whose UNet takes no text_time conditions; give a "
                            f"text-to-image SDXL model")
        scheduler_config = dict(hub.load(DDPMScheduler, cfg.model, "scheduler", cfg.revision).config)
        vae = hub.load(AutoencoderKL, cfg.model, "vae", cfg.revision, torch_dtype=dtype)
        if dtype == torch.float16 and vae.config.get("force_upcast", True):
            # SDXL's VAE overflows in float16 (the pipeline upcasts it to decode): kept in float32.
            vae = hub.load(AutoencoderKL, cfg.model, "vae", cfg.revision, torch_dtype=torch.float32)
        self.vae = vae.eval().requires_grad_(False)

        def load(cls, sub):
            return hub.load(cls, cfg.model, sub, cfg.revision, torch_dtype=dtype).eval().requires_grad_(False)

        self.text_encoder = load(CLIPTextModel, "text_encoder")
        self.text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2")
        self.tokenizers = [hub.load(CLIPTokenizer, cfg.model, sub, cfg.revision) for sub in ("tokenizer", "tokenizer_2")]
        self.zero_unconditional = bool(pipeline_config.get("force_zeros_for_empty_prompt", True))
        self._latent_setup(unet, scheduler_config, dtype)

    @property
    def condition_shape(self) -> tuple[int, int]:
        """The packed condition's (tokens, width)."""
        return self.tokenizers[0].model_max_length + 1, self.unet_config.cross_attention_dim

    @property
    def unet_config(self):
        return self.real.unet.config

    def time_ids(self, n: int) -> torch.Tensor:
        """add_time_ids: original size, crop top-left, target size, for the teacher's resolution."""
        h, w = (s * self.vae_scale_factor for s in self.sample_shape[1:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(n, -1)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """The ids of both tokenisers side by side, int32 on the CPU."""
        return torch.cat([tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                              return_tensors="pt").input_ids for tok in self.tokenizers], dim=1).int()

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (token_ids) to the packed condition, as StableDiffusionXLPipeline.encode_prompt
        makes it: both encoders' penultimate states side by side; the second's pooled projection."""
        first, second = ids.to(self.device).long().split([t.model_max_length for t in self.tokenizers], dim=1)
        a = self.text_encoder(first, output_hidden_states=True).hidden_states[-2]
        out = self.text_encoder_2(second, output_hidden_states=True)
        embeds = torch.cat([a, out.hidden_states[-2]], dim=-1)
        return pack_text(embeds, torch.cat([out[0], self.time_ids(len(ids)).to(out[0].dtype)], dim=-1))

    def null_condition(self, n: int):
        if self._empty is None:
            if self.zero_unconditional:   # the tokens and pooled embedding zero, the time ids kept
                config, dtype = self.unet_config, self.text_encoder.dtype
                pooled = torch.zeros(1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                                     device=self.device, dtype=dtype)
                tokens = torch.zeros(1, self.tokenizers[0].model_max_length, config.cross_attention_dim,
                                     device=self.device, dtype=dtype)
                self._empty = pack_text(tokens, torch.cat([pooled, self.time_ids(1).to(dtype)], dim=-1))
            else:
                self._empty = self.encode_text([""])
        return self._empty.expand(n, -1, -1)

    def describe(self) -> dict:
        return {**super().describe(), "kind": "sdxl", "zero_unconditional": self.zero_unconditional}
