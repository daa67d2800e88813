"""The EDM teacher family (Karras et al. 2022): VE noise, EDM preconditioning, the ADM network.

EDM's ImageNet-64 model is ADM (Dhariwal & Nichol) behind EDM's preconditioning:
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels) with sigma_data = 0.5 (EDM table 1).
The network below is written for this project; its modules and parameter names follow EDM's
`DhariwalUNet` layout so that `dmd convert-teacher` maps NVIDIA's pickle onto it key for key
(see convert.py). Class labels enter as one-hot vectors; no label (None) is the zero vector.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import UserError
from ..schedules import EDMSchedule
from ..losses import classifier_free_guidance
from .base import Teacher, resolve_dtype

FORMAT = "dmd-edm/1"
ADM_IMAGENET64 = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                      attn_resolutions=[32, 16, 8], dropout=0.1, augment_dim=0)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM table 1, for sigma of any shape."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    return d2 / (s2 + d2), sigma * sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt(), sigma.log() / 4


def _uniform(shape, fan_in: int, gain: float = 1.0) -> torch.Tensor:
    return (torch.rand(*shape) * 2 - 1) * gain / math.sqrt(fan_in)


class Linear(nn.Module):
    def __init__(self, cin: int, cout: int, bias: bool = True, zero: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin) if zero else _uniform((cout, cin), cin))
        self.bias = nn.Parameter(torch.zeros(cout) if zero else _uniform((cout,), cin)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)


class Conv2d(nn.Module):
    """kernel 0: no weights (a pure resampling); up/down: x2 nearest / 2x2 mean with EDM's
    [1, 1] filter, kept as the buffer `resample_filter` as in EDM's files."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, up: bool = False, down: bool = False,
                 zero: bool = False):
        super().__init__()
        self.cin, self.out_channels, self.up, self.down = cin, cout, up, down
        fan_in = cin * kernel * kernel
        self.weight = (nn.Parameter(torch.zeros(cout, cin, kernel, kernel) if zero
                                    else _uniform((cout, cin, kernel, kernel), fan_in)) if kernel else None)
        self.bias = nn.Parameter(torch.zeros(cout) if zero else _uniform((cout,), fan_in)) if kernel and bias else None
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25) if up or down else None)

    def forward(self, x):
        if self.up:
            x = F.conv_transpose2d(x, self.resample_filter.to(x.dtype).mul(4).tile(self.cin, 1, 1, 1),
                                   groups=self.cin, stride=2)
        if self.down:
            x = F.conv2d(x, self.resample_filter.to(x.dtype).tile(self.cin, 1, 1, 1), groups=self.cin, stride=2)
        if self.weight is not None:
            b = self.bias.to(x.dtype) if self.bias is not None else None
            x = F.conv2d(x, self.weight.to(x.dtype), b, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = min(32, channels // 4), eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """ADM residual block: adaptive group-norm scale/shift from the embedding, optional
    up/down-sampling and multi-head self-attention (64 channels a head)."""

    def __init__(self, cin: int, cout: int, emb: int, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = cin, cout, dropout
        self.num_heads = cout // 64 if attention else 0
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = Linear(emb, cout * 2)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, zero=True)
        self.skip = Conv2d(cin, cout, 1 if cout != cin else 0, up=up, down=down) if cout != cin or up or down else None
        if self.num_heads:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1)
            self.proj = Conv2d(cout, cout, 1, zero=True)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.num_heads:
            b, c, h, w = x.shape
            # EDM's channel layout (heads, channels per head, q/k/v, pixels), as 4-D tensors
            # (batch, heads, pixels, channels) so that SDPA can take its fused kernels on GPUs.
            q, k, v = self.qkv(self.norm2(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w).unbind(3)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = self.proj(a.transpose(-1, -2).reshape(b, c, h, w)) + x
        return x


class ADMUNet(nn.Module):
    """ADM for EDM: F(x; c_noise, one-hot labels). Defaults are EDM's ImageNet-64 network."""

    def __init__(self, img_resolution: int = 64, in_channels: int = 3, out_channels: int = 3, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions=(32, 16, 8), dropout: float = 0.1, augment_dim: int = 0):
        super().__init__()
        emb = model_channels * channel_mult_emb
        self.model_channels = model_channels
        self.map_augment = Linear(augment_dim, model_channels, bias=False, zero=True) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)
        block = dict(emb=emb, dropout=dropout)
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, zero=True)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.gradient_checkpointing = True

    def _block(self, blk, x, emb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(blk, x, emb, use_reentrant=False)
        return blk(x, emb)

    def bottleneck(self) -> tuple[nn.Module, int]:
        """The lowest-resolution block (DMD2's GAN head reads its output) and its channels."""
        name = next(n for n in self.dec if n.endswith("_in1"))
        return self.dec[name], self.dec[name].out_channels

    def forward(self, x, noise_labels, class_labels=None):
        half = self.model_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        emb = torch.outer(noise_labels.float(), freqs)
        emb = torch.cat([emb.cos(), emb.sin()], dim=1)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        emb = F.silu(emb)
        skips = []
        for blk in self.enc.values():
            x = self._block(blk, x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(blk, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMDenoiser(nn.Module):
    """D(x; sigma) around an ADM network, in our calling convention: net(x_t, t, labels) with
    t an index into the schedule's 1000 ascending Karras sigmas; `denoise_sigma` takes sigma."""

    prediction_type = "sample"

    def __init__(self, model: ADMUNet, label_dim: int, sigmas: torch.Tensor, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.label_dim, self.sigma_data = model, label_dim, sigma_data
        self.register_buffer("sigmas", sigmas.float(), persistent=False)

    def bottleneck(self):
        return self.model.bottleneck()

    def denoise_sigma(self, x, sigma, labels=None):
        sigma = sigma.float().reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        # Label `label_dim` (a dropped label) and no labels are EDM's zero vector: unconditional.
        onehot = (F.one_hot(labels.long(), self.label_dim + 1)[:, :self.label_dim].float() if labels is not None
                  else torch.zeros(len(x), self.label_dim, device=x.device)) if self.label_dim else None
        out = self.model(c_in * x.float(), c_noise.flatten(), onehot)
        return c_skip * x.float() + c_out * out.float()

    def forward(self, x_t, t, labels=None):
        return self.denoise_sigma(x_t, self.sigmas[t.long()], labels)


def load_edm_folder(folder: Path) -> tuple[dict, dict]:
    """(config, state dict) of a folder written by `dmd convert-teacher`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"{folder} is not an EDM teacher folder (config.json and model.safetensors); make one "
                        f"with `dmd convert-teacher edm-imagenet-64x64-cond-adm.pkl --out {folder}`")
    try:
        config = json.loads(cfg_file.read_text())
        fmt = config.get("format")
    except (ValueError, AttributeError) as e:
        raise UserError(f"{cfg_file} is not a teacher config ({e}); convert the teacher again") from None
    if fmt != FORMAT:
        raise UserError(f"{cfg_file} has format {fmt!r}, expected {FORMAT!r}")
    missing = [k for k in ("img_resolution", "img_channels", "label_dim", "model") if k not in config]
    if missing:
        raise UserError(f"{cfg_file} lacks {', '.join(missing)}; convert the teacher again")
    try:
        return config, load_file(str(weights))
    except Exception as e:   # safetensors raises its own error types
        raise UserError(f"{weights} is not readable safetensors ({e}); convert the teacher again") from None


def build_network(config: dict, state: dict | None = None) -> ADMUNet:
    net = ADMUNet(config["img_resolution"], config["img_channels"], config["img_channels"], config["label_dim"],
                  **config["model"])
    if state is not None:
        try:
            missing, unexpected = net.load_state_dict({k.removeprefix("model."): v for k, v in state.items()},
                                                      strict=False)
        except RuntimeError as e:   # a shape that differs from the config's
            raise UserError(f"the teacher's weights do not fit its config: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise UserError(f"the teacher's weights do not fit its config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return net


class EDMTeacher(Teacher):
    """A converted EDM network (`dmd convert-teacher`): x0 predictions at Karras sigmas."""

    name = "edm"
    family = "edm"
    default_sampler = "heun"
    preview_limit = 100
    preview_batch = 25

    def __init__(self, cfg):
        self.cfg = cfg
        if not cfg.model:
            raise UserError("teacher.edm.model is empty: give a folder made by `dmd convert-teacher`")
        from .hub import SHIPPED_EDM

        folder = Path(cfg.model)
        if not folder.exists() and cfg.model in SHIPPED_EDM:   # a local folder of that name comes first
            folder = SHIPPED_EDM[cfg.model]
        self.folder = folder
        self.config, state = load_edm_folder(folder)
        c = self.config
        self.schedule = EDMSchedule(sigma_data=c.get("sigma_data", 0.5))
        self.num_classes = c["label_dim"] or None
        self.sample_shape = (c["img_channels"], c["img_resolution"], c["img_resolution"])
        net = build_network(c, state)
        self._trainable = net
        self.real = EDMDenoiser(copy.deepcopy(net), c["label_dim"], self.schedule.sigmas).eval().requires_grad_(False)
        self.dtype = resolve_dtype(cfg.dtype)
        self.device = torch.device("cpu")

    def _copy(self) -> EDMDenoiser:
        if self._trainable is None:
            raise RuntimeError("the teacher's trainable weights were released (release_trainable)")
        net = copy.deepcopy(self._trainable).float().train().requires_grad_(True)
        for m in net.modules():
            if isinstance(m, UNetBlock):
                m.dropout = self.cfg.dropout
        return EDMDenoiser(net, self.config["label_dim"], self.schedule.sigmas)

    make_generator = _copy
    make_critic = _copy

    def check_guidance(self, guidance: float) -> None:
        if guidance != 1.0 and not self.config.get("unconditional"):
            raise UserError(f"guidance {guidance} needs an unconditional model, and this EDM network was trained "
                            f"without label dropout (as EDM's own); set teacher.guidance = 1 (--guidance 1)")

    @torch.no_grad()
    def denoise_sigma(self, x, sigma, cond, guidance: float = 1.0):
        """D(x; sigma); with guidance s != 1, the standard CFG form uncond + s (cond - uncond) on
        x0, the same as on epsilon at one x_t (the unconditional input is the zero label vector)."""
        self.check_guidance(guidance)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if guidance == 1.0 or cond is None:
                return self.real.denoise_sigma(x, sigma, cond)
            sigma = sigma.reshape(-1).expand(len(x))
            null = torch.full_like(cond, self.config["label_dim"])
            both = self.real.denoise_sigma(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, cond]))
            uncond, conditional = both.chunk(2)
            return classifier_free_guidance(uncond, conditional, guidance)

    def denoise(self, x_t, t, cond, guidance: float = 1.0):
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return self.denoise_sigma(x_t, self.schedule.sigma(t).to(x_t.device), cond, guidance)

    def to(self, device):
        self.device = torch.device(device)
        self.real.to(device)
        return self

    def describe(self) -> dict:
        return {"name": self.name, "model": str(self.folder.resolve()), "source": self.config.get("source"),
                "sample_shape": list(self.sample_shape)}

    def save_preview(self, student, teacher, labels, path: Path, title: str = "") -> None:
        from ..evaluation.plots import class_grid

        class_grid(student, teacher, min(self.num_classes or 10, 10), self.to_images, path)
