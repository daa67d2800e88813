"""Small networks for low-dimensional teachers (the exact GMM): an MLP denoiser.

Image teachers bring their own networks (diffusers UNets); this file is only for vectors.
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class MLPDenoiser(nn.Module):
    """net(x_t, t, labels) -> prediction of `prediction_type` ("sample", "epsilon", ...).

    Input: x_t, a sinusoidal embedding of t, and a learned class embedding whose last row
    is the null class (for classifier-free guidance) when num_classes is set. activation:
    "silu" (smooth, for scores) or "relu" (piecewise linear, for maps with sharp edges).
    x_alone_init: draw x_t's first-layer weights as if x_t were the layer's only input.
    nn.Linear draws them at 1/sqrt(fan_in), and the embeddings widen the fan-in from dim to
    dim + time_channels (+ hidden), which shrinks x_t's weights (4.1 times for 2-D): a map that
    must jump between modes then starts too smooth, and Adam's bounded steps take long to grow it.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, num_classes: int | None = None,
                 prediction_type: str = "epsilon", time_channels: int = 32, num_train_timesteps: int = 1000,
                 activation: str = "silu", x_alone_init: bool = False):
        super().__init__()
        self.prediction_type = prediction_type
        self.time_channels = time_channels
        self.num_train_timesteps = num_train_timesteps
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        widths = [dim + time_channels + (hidden if num_classes else 0)] + [hidden] * layers
        act = {"silu": nn.SiLU, "relu": nn.ReLU}[activation]
        body: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            body += [nn.Linear(a, b), act()]
        self.body = nn.Sequential(*body, nn.Linear(hidden, dim))
        if x_alone_init:
            with torch.no_grad():
                self.body[0].weight[:, :dim] *= math.sqrt(widths[0] / dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        # Scale t to [0, 1000) whatever T is, so the embedding frequencies stay meaningful.
        temb = get_timestep_embedding(t.float() * (1000.0 / self.num_train_timesteps), self.time_channels)
        parts = [x_t, temb.to(x_t.dtype)]
        if self.label_embedding is not None:
            if labels is None:
                labels = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long)
            parts.append(self.label_embedding(labels).to(x_t.dtype))
        return self.body(torch.cat(parts, dim=1))


class UNetDenoiser(nn.Module):
    """A diffusers UNet in our calling convention: net(x_t, t, cond) -> prediction.

    cond is text embeddings for UNet2DConditionModel, class labels (last = null class) for a
    class-conditional UNet2DModel, None for an unconditional one.
    """

    def __init__(self, unet: nn.Module, prediction_type: str, null_class: int | None = None,
                 timesteps: torch.Tensor | None = None):
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        self.null_class = null_class
        self.text_conditioned = hasattr(unet.config, "cross_attention_dim") and unet.config.cross_attention_dim
        # Flow models take the timestep sigma * 1000, not the index: the table, per index, moves
        # with the module and stays out of its state dict.
        self.register_buffer("timesteps", timesteps.float() if timesteps is not None else None, persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.call(x_t, self.timesteps[t.long()] if self.timesteps is not None else t, cond)

    def call(self, x_t: torch.Tensor, model_t: torch.Tensor, cond=None) -> torch.Tensor:
        """The network at the timestep it reads (an index, or a flow model's sigma * 1000)."""
        dtype = self.unet.dtype
        if self.text_conditioned:
            return self.unet(x_t.to(dtype), model_t, encoder_hidden_states=cond.to(dtype)).sample
        if self.null_class is not None and cond is None:
            cond = torch.full((x_t.shape[0],), self.null_class, device=x_t.device, dtype=torch.long)
        return self.unet(x_t.to(dtype), model_t, class_labels=cond).sample


class TransformerDenoiser(UNetDenoiser):
    """SD3's MMDiT (SD3Transformer2DModel) in the same convention. Its text condition is two
    tensors, the token embeddings (B, L, D) and the pooled embedding (B, P); `cond` carries
    both as one (B, L + 1, D) tensor, the pooled one zero-padded as the last token (see
    pack_text), so that batching, CFG's concatenation and indexing treat it as any other.
    (The attribute keeps the name `unet`, which its state dict's keys carry.)"""

    def call(self, x_t: torch.Tensor, model_t: torch.Tensor, cond=None) -> torch.Tensor:
        dtype, pooled = self.unet.dtype, self.unet.config.pooled_projection_dim
        patch = self.unet.config.patch_size
        self._grid = (x_t.shape[-2] // patch, x_t.shape[-1] // patch)   # for bottleneck_output
        return self.unet(hidden_states=x_t.to(dtype), timestep=model_t, encoder_hidden_states=cond[:, :-1].to(dtype),
                         pooled_projections=cond[:, -1, :pooled].to(dtype)).sample

    def bottleneck(self) -> tuple[nn.Module, int]:
        """The middle joint block (the GAN head reads its image tokens)."""
        blocks = self.unet.transformer_blocks
        return blocks[(len(blocks) - 1) // 2], self.unet.inner_dim

    def bottleneck_output(self, output) -> torch.Tensor:
        """A joint block's (text tokens, image tokens) to the image tokens as a feature map."""
        tokens = output[1]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self._grid)


def pack_text(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """TransformerDenoiser's `cond`: the pooled embedding as one more, zero-padded, token."""
    if pooled.shape[-1] > embeds.shape[-1]:
        raise ValueError(f"pooled embedding ({pooled.shape[-1]}) wider than the tokens ({embeds.shape[-1]})")
    last = torch.nn.functional.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([embeds, last.to(embeds.dtype)], dim=1)


class GANHead(nn.Module):
    """DMD2's classifier on the critic's bottleneck features: real (> 0) or generated (< 0).
    Feature maps (B, C, h, w) go through two strided convolutions and a pooled linear layer;
    feature vectors (B, C) through a small MLP."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        if spatial:
            groups = 32 if channels % 32 == 0 else 1
            self.net = nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(1)


def bottleneck(net: nn.Module) -> tuple[nn.Module, int, bool]:
    """(module whose output is the bottleneck, its channels, whether it is a feature map):
    the UNet's mid-block (SD: 1280 channels at 8x8), the network's own choice, or the MLP's
    last hidden layer."""
    if hasattr(net, "bottleneck"):   # networks that name their own (EDM's ADM, SD3's transformer)
        module, channels = net.bottleneck()
        return module, channels, True
    if isinstance(net, UNetDenoiser):
        return net.unet.mid_block, net.unet.config.block_out_channels[-1], True
    if isinstance(net, MLPDenoiser):
        return net.body[-2], net.body[-1].in_features, False
    raise TypeError(f"no known bottleneck in {type(net).__name__}")


# Attention, feed-forward and residual-block layers of diffusers UNets: where LoRA adapters go
# (the layer kinds DMD2's SDXL LoRA adapts).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def add_lora(net: nn.Module, rank: int) -> None:
    """Freeze the diffusers UNet inside `net` and give it trainable LoRA adapters (peft)."""
    from .utils.errors import UserError

    unet = getattr(net, "unet", None)
    if unet is None:
        raise UserError("train.lora_rank needs a diffusers UNet teacher (sd or unet2d); set it to 0")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("train.lora_rank needs peft: pip install peft (or set train.lora_rank = 0)") from None
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS), unet)


def merge_lora(unet: nn.Module) -> bool:
    """Fold LoRA adapters into their layers and remove them (a plain UNet again); False if
    there were none."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        return False
    from diffusers.utils import recurse_remove_peft_layers

    for layer in layers:
        layer.merge()
    recurse_remove_peft_layers(unet)
    return True


def enable_gradient_checkpointing(net: nn.Module) -> bool:
    """Turn on activation recomputation in a diffusers UNet or EDM's ADM inside `net`;
    False for networks too small to have it (the MLP)."""
    inner = getattr(net, "unet", None) or getattr(net, "model", None)
    if inner is None or not hasattr(inner, "enable_gradient_checkpointing"):
        return False
    inner.enable_gradient_checkpointing()
    return True


class _AtBottleneck(Exception):
    """Raised by the bottleneck hook to end a pass whose only use is the GAN head's logits."""


class CriticWithHead(nn.Module):
    """The critic (fake score) plus a GAN head on its bottleneck: one module, so one optimiser
    and one DDP wrapper serve both, and the GAN loss also trains the critic's backbone (DMD2).

    forward(x_t, t, cond, real=None) -> (prediction, logits): the full critic on x_t; with
    `real` = (x_r, t_r, cond_r), real images also pass, up to the bottleneck only, in the same
    call (DDP: one forward per backward), and the logits are the fakes' then the reals'.
    `logits(x_t, t, cond)` stops at the bottleneck too: the decoder's half is not run
    (unless stop_at_bottleneck is False: FSDP2 cannot end a pass mid-forward)."""

    def __init__(self, critic: nn.Module, stop_at_bottleneck: bool = True):
        super().__init__()
        self.critic = critic
        self.stop_at_bottleneck = stop_at_bottleneck
        self.prediction_type = critic.prediction_type
        module, channels, spatial = bottleneck(critic)
        self.head = GANHead(channels, spatial)
        self._features, self._mode = None, None   # mode: None (not listening), "keep", "stop"
        module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if self._mode is None:   # e.g. gradient checkpointing's recomputation in backward
            return
        select = getattr(self.critic, "bottleneck_output", None)
        self._features = select(output) if select else output[0] if isinstance(output, tuple) else output
        if self._mode == "stop":
            raise _AtBottleneck

    def _run(self, mode: str, x_t, t, cond):
        """(critic output or None, bottleneck features)."""
        self._mode, pred = mode, None
        try:
            pred = self.critic(x_t, t, cond)
        except _AtBottleneck:
            pass
        finally:
            self._mode = None
        features, self._features = self._features, None
        return pred, features

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.head(self._run("stop" if self.stop_at_bottleneck else "keep", x_t, t, cond)[1])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, real=None):
        pred, features = self._run("keep", x_t, t, cond)
        logits = self.head(features)
        if real is not None:
            logits = torch.cat([logits, self.logits(*real)])
        return pred, logits


@contextlib.contextmanager
def frozen(module: nn.Module):
    """The module's trainable parameters frozen inside the block, restored after (LoRA-safe)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)
