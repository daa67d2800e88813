"""Activation memory of the training passes, measured without a GPU (for `distill --dry-run`).

The networks are moved to PyTorch's meta device (shapes, no storage) and each pass runs
there at the recipe's batch size, so even SD1.5 costs a second. What is counted is what
autograd keeps for backward: every tensor saved by a differentiable op, each storage once,
parameters excluded. Three things make that figure the one a GPU would hold:
- bf16 mixed precision is emulated above autograd, like CUDA's autocast: matrix products,
  convolutions and attention take bf16 inputs (weights cast once per pass, the casts kept,
  as autocast's cache keeps them); norms and softmax run in fp32.
- Attention saves what flash attention saves on a GPU (q, k, v, the output and the
  row log-sum-exp), not the n x n matrix of the math kernel the meta device would use.
- Gradient checkpointing keeps each segment's inputs, and the backward pass recomputes one
  segment at a time: the largest segment's activations are added once.
Not counted: the backward pass's transient gradient buffers and the allocator's slack.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LOW = {F.conv1d, F.conv2d, F.conv_transpose2d, F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.bmm, torch.baddbmm, torch.addmm, torch.mm, torch.einsum}
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax}


class _Autocast(TorchFunctionMode):
    """CUDA autocast's casts, emulated for meta tensors (autocast itself skips them)."""

    def __init__(self, dtype: torch.dtype, saved: "_Saved", fp32_ops=frozenset(_FP32)):
        super().__init__()
        self.dtype, self.weights, self.saved, self.fp32_ops = dtype, {}, saved, fp32_ops

    def _cast(self, a, dtype):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == dtype:
            return a
        if isinstance(a, torch.nn.Parameter):   # autocast casts a weight once per region and keeps it
            key = (id(a), dtype)
            if key not in self.weights:
                self.weights[key] = w = a.to(dtype)
                self.saved.kept(w)
            return self.weights[key]
        return a.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in _LOW else torch.float32 if func in self.fp32_ops else None
        if dtype is not None:
            args = [self._cast(a, dtype) for a in args]
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items() if k != "dtype"}
        return func(*args, **kwargs)


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward; the values are meta, so none is computed."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Saved:
    """Bytes autograd saves, outside checkpointed segments and in the largest segment."""

    def __init__(self, params):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.outside, self.segment, self.largest, self.casts = {}, None, 0, 0

    def kept(self, weight):
        """A weight's autocast copy: held for the whole pass, also while segments recompute."""
        self.skip.add(weight.untyped_storage()._cdata)
        self.casts += weight.untyped_storage().nbytes()

    def _add(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.skip:
            (self.segment if self.segment is not None else self.outside)[key] = t.untyped_storage().nbytes()

    def pack(self, t):
        self._add(t)
        return t

    def checkpoint(self, fn, *args, use_reentrant=None, **kwargs):
        """torch.utils.checkpoint.checkpoint's memory: it keeps the inputs, and backward
        recomputes the segment (its saved tensors live only then)."""
        outer, self.segment = self.segment, {}
        out = fn(*args, **kwargs)
        self.largest = max(self.largest, sum(self.segment.values()))
        self.segment = outer
        for a in args:
            if isinstance(a, torch.Tensor):
                self._add(a)
        return out

    @property
    def total(self) -> int:
        return sum(self.outside.values()) + self.largest + self.casts


def saved_bytes(fn, modules, dtype: torch.dtype | None, fp32_ops=frozenset(_FP32)) -> int:
    """Activation bytes that `fn()` (a forward pass of meta-device `modules`) holds for its
    backward, under emulated autocast at `dtype` (None: no autocast) with CUDA's ops kept in
    fp32 (`fp32_ops`: another device's list)."""
    saved = _Saved([p for m in modules for p in m.parameters()])
    low = dtype if dtype is not None and dtype != torch.float32 else None

    def attention(q, k, v, *args, **kwargs):   # autocast runs attention in bf16 too
        return _FlashAttention.apply(*(x.to(low) if low else x for x in (q, k, v)))

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.utils.checkpoint.checkpoint", saved.checkpoint))
        stack.enter_context(mock.patch("torch.nn.functional.scaled_dot_product_attention", attention))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t))
        if low:
            stack.enter_context(_Autocast(low, saved, fp32_ops))
        fn()
    return saved.total
