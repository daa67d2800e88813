"""`dmd convert-teacher`: NVIDIA's EDM pickles to safetensors, without running them.

What an EDM snapshot (`edm-imagenet-64x64-cond-adm.pkl`, `network-snapshot-*.pkl`) holds,
from EDM's public source (training/training_loop.py, torch_utils/persistence.py):

- `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...))`, where
  `ema` is an `EDMPrecond` whose `model` is a `DhariwalUNet` (ADM).
- Every network class is a "persistent class": an instance pickles as the call
  `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type: 'class',
  version: 6, module_src: the source code of its whole module, class_name, state: the
  instance's __dict__}. Loading it the usual way exec()s module_src and needs NVIDIA's
  `torch_utils` and `dnnlib`. We never do either: meta becomes a `Persistent` record.
- A module's __dict__ holds torch's internals: `_parameters`, `_buffers` and `_modules`
  (OrderedDicts), `_non_persistent_buffers_set`, attributes such as `img_resolution`,
  `label_dim` and `sigma_data`, and `_init_kwargs`, the constructor's keyword arguments.
  Plain torch containers (`ModuleDict`) pickle as a class plus their __dict__.
- Tensors: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
  `_rebuild_parameter(tensor, requires_grad, hooks)`; a storage is
  `torch.storage._load_from_bytes(b)`, b being a legacy `torch.save` of it, which we read
  with `torch.load(weights_only=True)`.
- numpy scalars (constructor arguments such as init_weight = np.sqrt(1/3)) and
  `dnnlib.util.EasyDict` (as a dict).

Any other global is refused by name: importing it could run code. `--trust-pickle` lets
such globals be imported (the file may then run anything), still without exec()ing
module_src; only tensors and plain values are kept either way.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import shutil
import types
from collections import OrderedDict
from pathlib import Path

import torch

from .edm import ADM_IMAGENET64, FORMAT, build_network
from ..utils.errors import UserError
from ..utils.io import sha256

TRUST_HINT = ("pass --trust-pickle only if you trust where the file came from: it lets the file import "
              "and call that code, which can do anything your account can")


class Persistent:
    """An EDM persistent object, recorded instead of rebuilt: its class name and state."""

    def __init__(self, meta: dict):
        self.class_name = meta.get("class_name")
        self.state = dict(meta.get("state") or {})


class Node:
    """A plain torch container (ModuleDict, ...): only its __dict__ is kept."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


class EasyDict(dict):
    pass


def _storage_from_bytes(b: bytes):
    """A storage saved inside the pickle (a legacy torch.save), read with torch's own
    weights-only unpickler (which needs torch >= 2.6: CVE-2025-32434)."""
    try:
        return torch.load(io.BytesIO(b), weights_only=True)
    except Exception as e:   # torch's message is many lines and suggests weights_only=False
        raise UserError(f"a tensor storage in the pickle is not plain tensor data ({type(e).__name__}); "
                        f"refused") from None


def _allowed(module: str, name: str):
    import numpy

    if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        return Persistent
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        return getattr(torch._utils, name)
    if (module, name) == ("torch.storage", "_load_from_bytes"):
        return _storage_from_bytes
    if (module, name) == ("_codecs", "encode"):   # how protocol 2 writes bytes
        import _codecs

        return _codecs.encode
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if module == "builtins" and name in ("set", "frozenset", "slice"):
        return {"set": set, "frozenset": frozenset, "slice": slice}[name]
    if (module, name) == ("dnnlib.util", "EasyDict"):
        return EasyDict
    if module.startswith("torch.nn.modules."):
        return Node
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        import importlib

        try:
            return getattr(importlib.import_module("numpy._core.multiarray"), name)
        except ImportError:   # numpy 1.x
            return getattr(importlib.import_module("numpy.core.multiarray"), name)
    if module == "numpy" and name in ("dtype", "ndarray"):
        return getattr(numpy, name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path, trust: bool):
        super().__init__(f)
        self.path, self.trust = path, trust

    def find_class(self, module: str, name: str):
        found = self._find(module, name)
        # A fresh class or wrapper per lookup: a BUILD opcode aimed at what we return can then
        # alter nothing that outlives this load (our classes, torch's functions).
        if isinstance(found, type) and issubclass(found, (Persistent, Node, EasyDict)):
            return type(found.__name__, (found,), {})
        if isinstance(found, (types.FunctionType, types.BuiltinFunctionType)):
            return functools.partial(found)
        return found

    def _find(self, module: str, name: str):
        import _compat_pickle   # Python 2 names (protocols < 3), mapped as pickle itself does

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _allowed(module, name)
        if found is not None:
            return found
        if self.trust:
            return super().find_class(module, name)
        raise UserError(f"{self.path} asks to import {module}.{name}, which is not a tensor or a plain "
                        f"container; refused because loading it could run code; {TRUST_HINT}")


def read_pickle(path: Path, trust: bool = False):
    """The pickle's contents with persistent objects as `Persistent` records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, path, trust).load()
        except UserError:
            raise
        except Exception as e:   # truncated or not a pickle at all
            raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); "
                            f"download it again") from None


def _state(obj) -> dict:
    return obj.state if isinstance(obj, (Persistent, Node)) else {}


def tensors_of(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a recorded module tree, named as in a state dict."""
    st, out = _state(obj), {}
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = t.detach().clone().contiguous()
    for name, child in (st.get("_modules") or {}).items():
        if child is not None:
            out.update(tensors_of(child, f"{prefix}{name}."))
    return out


def edm_config(net: Persistent, path: Path) -> dict:
    """Our teacher config from an EDMPrecond record and its DhariwalUNet."""
    if not isinstance(net, Persistent) or net.class_name != "EDMPrecond":
        name = net.class_name if isinstance(net, Persistent) else type(net).__name__
        raise UserError(f"{path}: its network is {name}, not EDMPrecond; convert-teacher reads EDM's "
                        f"EDM-preconditioned networks (VP/VE/iDDPM preconditioning is not supported)")
    model = (net.state.get("_modules") or {}).get("model")
    if not isinstance(model, Persistent) or model.class_name != "DhariwalUNet":
        raise UserError(f"{path}: its network's model is "
                        f"{getattr(model, 'class_name', type(model).__name__)}, not DhariwalUNet (ADM); "
                        f"only the ADM architecture is supported")
    kwargs = dict(model.state.get("_init_kwargs") or {})
    arch = {k: kwargs.get(k, v) for k, v in ADM_IMAGENET64.items()}
    arch = {k: (list(v) if isinstance(v, (list, tuple)) else type(ADM_IMAGENET64[k])(v)) for k, v in arch.items()}
    arch["channel_mult"] = [int(m) for m in arch["channel_mult"]]
    arch["attn_resolutions"] = [int(r) for r in arch["attn_resolutions"]]
    s = net.state
    sigma_max = float(s.get("sigma_max", float("inf")))
    return {"format": FORMAT, "architecture": "adm", "img_resolution": int(s["img_resolution"]),
            "img_channels": int(s["img_channels"]), "label_dim": int(s.get("label_dim", 0)),
            "sigma_data": float(s.get("sigma_data", 0.5)), "sigma_min": float(s.get("sigma_min", 0)),
            "sigma_max": sigma_max if sigma_max < float("inf") else None, "model": arch}


def convert_edm(src: Path, out: Path, trust: bool = False) -> dict:
    """Convert an EDM pickle into out/config.json + out/model.safetensors; returns the config."""
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new --out folder")
    data = read_pickle(src, trust)
    net = data.get("ema") if isinstance(data, dict) else data
    try:
        config = edm_config(net, src)
        state = tensors_of(net)
    except (KeyError, TypeError, AttributeError, ValueError) as e:   # records without what EDM writes
        raise UserError(f"{src} does not hold an EDM network in the layout EDM writes ({type(e).__name__}: "
                        f"{e}); convert-teacher reads EDM's own snapshots") from None
    config["source"] = {"file": src.name, "sha256": sha256(src)}
    model = build_network(config, state)   # proves the weights fit, names and shapes
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config
