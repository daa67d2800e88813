"""Teachers' architectures without their weights, on PyTorch's meta device: what `distill
--dry-run` measures when the recipe's teacher is not on this machine (offline, or not yet
converted). Only the shapes matter there, so only the published configurations are kept.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch

from .base import resolve_dtype
from .edm import ADM_IMAGENET64

# Stable Diffusion v1.5's published configurations (859,520,964 / 83,653,863 / 123,060,480 parameters).
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768),
}
# Stable Diffusion XL base 1.0's published configurations (its UNet and the second text
# encoder, OpenCLIP bigG with its projection; the first text encoder and the VAE are SD1.5's).
SDXL = {
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
}
# Stable Diffusion 3.5 Medium's published configurations (its transformer 2,243,171,520 parameters;
# CLIP-L, CLIP-G and T5-XXL's encoder; the 16-channel VAE).
SD35_MEDIUM = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.0609, scaling_factor=1.5305,
                use_quant_conv=False, use_post_quant_conv=False),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    "text_encoder_3": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           feed_forward_proj="gated-gelu"),
}
# EDM's ImageNet-64 network as `dmd convert-teacher edm-imagenet-64x64-cond-adm.pkl` writes it
# (295,899,267 parameters).
EDM_IMAGENET64 = {"format": "dmd-edm/1", "architecture": "adm", "img_resolution": 64, "img_channels": 3,
                  "label_dim": 1000, "model": ADM_IMAGENET64, "sigma_data": 0.5}


def _frozen(module, dtype):
    return module.to(dtype).eval().requires_grad_(False)


def _sd15(cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..networks import UNetDenoiser

    dtype = resolve_dtype(cfg.dtype) if cfg.dtype != "auto" else torch.bfloat16   # "auto" on a bf16 GPU
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15["unet"])
        vae = _frozen(AutoencoderKL(**SD15["vae"]), dtype)
        text_encoder = _frozen(CLIPTextModel(CLIPTextConfig(**SD15["text_encoder"])), dtype)
    size = 64 if not cfg.resolution else cfg.resolution // 8
    trainable = lambda: UNetDenoiser(copy.deepcopy(unet).float().train().requires_grad_(True), "epsilon")
    return SimpleNamespace(
        name="sd", family="vp", num_classes=None, sample_shape=(4, size, size), vae=vae, text_encoder=text_encoder,
        real=UNetDenoiser(_frozen(copy.deepcopy(unet), dtype), "epsilon"), make_generator=trainable,
        make_critic=trainable, condition_shape=(77, 768),
        what="Stable Diffusion v1.5's architecture (its weights are not on this machine)")


def _sdxl(cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl import SDXLDenoiser

    dtype = resolve_dtype(cfg.dtype) if cfg.dtype != "auto" else torch.bfloat16
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL["unet"])
        parts = {"vae": AutoencoderKL(**{**SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025}),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15["text_encoder"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL["text_encoder_2"]))}
    size = 128 if not cfg.resolution else cfg.resolution // 8
    trainable = lambda: SDXLDenoiser(copy.deepcopy(unet).float().train().requires_grad_(True), "epsilon")
    return SimpleNamespace(
        name="sd", family="vp", num_classes=None, sample_shape=(4, size, size),
        **{k: _frozen(m, dtype) for k, m in parts.items()},
        real=SDXLDenoiser(_frozen(copy.deepcopy(unet), dtype), "epsilon"), make_generator=trainable,
        make_critic=trainable, condition_shape=(78, 2048),
        what="Stable Diffusion XL base 1.0's architecture (its weights are not on this machine)")


def _sd35_medium(cfg):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..networks import TransformerDenoiser
    from .sd3 import T5_MAX_LENGTH

    c = SD35_MEDIUM
    dtype = resolve_dtype(cfg.dtype) if cfg.dtype != "auto" else torch.bfloat16
    with torch.device("meta"):
        net = SD3Transformer2DModel(**c["transformer"])
        parts = {"vae": AutoencoderKL(**c["vae"]),
                 "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])),
                 "text_encoder_3": T5EncoderModel(T5Config(**c["text_encoder_3"]))}
    size = 128 if not cfg.resolution else cfg.resolution // 8
    trainable = lambda: TransformerDenoiser(copy.deepcopy(net).float().train().requires_grad_(True), "flow")
    return SimpleNamespace(
        name="sd", family="flow", num_classes=None, sample_shape=(16, size, size),
        **{k: _frozen(m, dtype) for k, m in parts.items()},
        real=TransformerDenoiser(_frozen(copy.deepcopy(net), dtype), "flow"), make_generator=trainable,
        make_critic=trainable, condition_shape=(77 + T5_MAX_LENGTH + 1, 4096),
        what="Stable Diffusion 3.5 Medium's architecture (its weights are not on this machine)")


def _edm_imagenet64(cfg):
    from ..schedules import EDMSchedule
    from .edm import EDMDenoiser, build_network

    c = EDM_IMAGENET64
    with torch.device("meta"):
        net = build_network(c)
    sigmas = EDMSchedule().sigmas.to("meta")
    trainable = lambda: EDMDenoiser(copy.deepcopy(net).float().train().requires_grad_(True), c["label_dim"], sigmas)
    return SimpleNamespace(
        name="edm", family="edm", num_classes=c["label_dim"], sample_shape=(3, 64, 64), vae=None, text_encoder=None,
        real=EDMDenoiser(_frozen(copy.deepcopy(net), resolve_dtype(cfg.dtype)), c["label_dim"], sigmas),
        make_generator=trainable, make_critic=trainable,
        what="EDM's ImageNet-64 architecture (the converted teacher is not on this machine)")


def architecture_only(teacher_cfg):
    """A stand-in teacher on the meta device for the recipes' published teachers, or None."""
    from .hub import ALIASES

    if teacher_cfg.name == "sd" and ALIASES.get(teacher_cfg.sd.model, teacher_cfg.sd.model) == ALIASES["sd15"]:
        return _sd15(teacher_cfg.sd)
    if teacher_cfg.name == "sd" and ALIASES.get(teacher_cfg.sd.model, teacher_cfg.sd.model) == ALIASES["sdxl"]:
        return _sdxl(teacher_cfg.sd)
    if teacher_cfg.name == "sd" and ALIASES.get(teacher_cfg.sd.model, teacher_cfg.sd.model) == ALIASES["sd35-medium"]:
        return _sd35_medium(teacher_cfg.sd)
    if teacher_cfg.name == "edm" and "imagenet64" in Path(teacher_cfg.edm.model).name.replace("-", ""):
        return _edm_imagenet64(teacher_cfg.edm)
    return None
