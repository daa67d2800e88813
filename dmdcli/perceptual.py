"""LPIPS (Zhang et al. 2018), DMD v1's regression distance (SPEC section 4), pickle-free.

The network is the `lpips` package's. Its weights come from one safetensors file that
`dmd convert-lpips` writes from the two files LPIPS needs: torchvision's ImageNet trunk
(VGG16 or AlexNet, a torch .pth) and the package's own linear layers (a .pth it ships).
Both are pickles, so converting them needs --trust-pickle; training never reads a pickle.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .utils.errors import UserError

FORMAT = "dmd-lpips/1"
NETS = ("vgg", "alex")
SIZE = 224   # the paper upsamples small images to 224 before LPIPS


def _lpips_network(net: str):
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the lpips package: pip install 'dmd[lpips]'") from None
    with warnings.catch_warnings():   # torchvision's notice about lpips' `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)


def _read_pth(path: Path, trust_pickle: bool) -> dict:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    if not trust_pickle:
        raise UserError(f"reading {path} means unpickling it (a torch .pth); if you trust the file, add "
                        f"--trust-pickle (torch's weights-only loader is used even then)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - any unreadable file is one user-facing line
        raise UserError(f"{path} is not a torch weights file ({str(e).splitlines()[0][:120]})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def convert_lpips(trunk: Path, out: Path, net: str = "vgg", linear: Path | None = None,
                  trust_pickle: bool = False) -> dict:
    """torchvision's trunk (`features.N.*` keys) plus lpips' linear layers -> one safetensors
    file with our network's keys, checked by loading it into the network."""
    from safetensors.torch import save_file

    from .utils.io import atomic_path

    if net not in NETS:
        raise UserError(f"--net must be one of {', '.join(NETS)}, got {net!r}")
    model = _lpips_network(net)
    if linear is None:
        import lpips

        linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    trunk_state, linear_state = _read_pth(Path(trunk), trust_pickle), _read_pth(Path(linear), trust_pickle)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("scaling_layer.")}
    for name in model.state_dict():
        if name.startswith("net.slice"):          # net.slice2.5.weight <- features.5.weight
            source = "features." + name.split(".", 2)[2]
            if source not in trunk_state:
                raise UserError(f"{trunk} has no {source!r}: give torchvision's {net} ImageNet weights "
                                f"(e.g. vgg16-397923af.pth)")
            state[name] = trunk_state[source]
        elif name.startswith("lin"):              # lins.2.model.1.weight (an alias) <- lin2.model.1.weight
            source = "lin" + name[5:] if name.startswith("lins.") else name
            if source not in linear_state:
                raise UserError(f"{linear} has no {source!r}: give the lpips package's v0.1/{net}.pth")
            state[name] = linear_state[source]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights do not fit LPIPS-{net}: {str(e).splitlines()[-1].strip()[:160]}") from None
    with atomic_path(Path(out)) as tmp:
        save_file({k: v.float().clone().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": FORMAT, "net": net})
    return {"net": net, "tensors": len(state)}


def load_lpips(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A frozen LPIPS network from a file made by `dmd convert-lpips`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LPIPS weights not found: {path}; make them with `dmd convert-lpips`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception:   # noqa: BLE001
        raise UserError(f"{path} is not a safetensors file; make it with `dmd convert-lpips`") from None
    if meta.get("format") != FORMAT or meta.get("net") not in NETS:
        raise UserError(f"{path} was not made by `dmd convert-lpips` (no {FORMAT} metadata)")
    model = _lpips_network(meta["net"])
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def lpips_distance(model: torch.nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS of images in [-1, 1] (1 or 3 channels), upsampled to 224 as in the paper."""
    def prepare(x):
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False) if x.shape[-1] < SIZE else x

    return model(prepare(pred), prepare(target)).mean()
