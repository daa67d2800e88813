"""FSDP2 for distill (train.sharding = "fsdp2"): the generator and the critic sharded over the
processes that `accelerate launch` started, the frozen teacher replicated.

Each network is split into FSDP units, one per block (the elements of its outermost
ModuleLists and ModuleDicts, and a `mid_block`), the rest (embeddings, input and output
layers) in the root's unit; `torch.distributed.fsdp.fully_shard` shards every parameter over
the processes (DTensors, dim 0). Forward all-gathers one unit at a time and frees it after;
backward reduce-scatters the gradients, averaged as DDP averages them, so a sharded run is the
unsharded run at the same global batch. Under bf16 the gathers run in bf16 and the gradient
reductions in fp32 (FSDP2's MixedPrecisionPolicy).

Checkpoints stay whole: the state dicts are gathered to full tensors on process 0
(torch.distributed.checkpoint.state_dict, full_state_dict) and written as the unsharded run
writes them, so `sample`, `export` and `init_from` read them unchanged; resuming scatters them
back (process 0 reads, the others receive). Optimiser states are keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .utils.errors import UserError

OPTIONS = dict(full_state_dict=True, cpu_offload=True)


def blocks(net: nn.Module) -> list[nn.Module]:
    """The network's FSDP units below the root: each element of the outermost ModuleLists and
    ModuleDicts (a UNet's down and up blocks, a DiT's transformer blocks, ADM's encoder and
    decoder blocks) and each `mid_block`; a network with none (the toy MLP) is one unit."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            elif isinstance(child, nn.ModuleDict):
                found.extend(child.values())
            elif name == "mid_block":
                found.append(child)
            else:
                walk(child)

    walk(net)
    return found


def check(recipe, num_processes: int) -> None:
    """Refuse, in one line, what sharding does not support, before anything is loaded."""
    t = recipe.train
    if num_processes < 2:
        raise UserError("train.sharding = 'fsdp2' shards over several processes and this run has one; launch it "
                        "with `accelerate launch --multi_gpu --num_processes N dmd distill ...`, or set "
                        "train.sharding = 'none'")
    if t.mixed_precision == "fp16":
        raise UserError("train.sharding = 'fsdp2' runs in bf16 or fp32, not fp16 (no sharded loss scaler here); "
                        "set train.mixed_precision = 'bf16' (the authors') or 'no'")
    if t.critic_ema_decay > 0:
        raise UserError("train.critic_ema_decay keeps an unsharded copy of the critic and is not supported with "
                        "train.sharding = 'fsdp2'; set it to 0 (the papers' setting)")


def shard(net: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """`net` sharded in place over all processes, block by block, then at its root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    net.to(device)
    for block in blocks(net):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's inputs stay as given (autocast casts per op): EDM's skip connection reads x_t in
    # fp32, where a bf16 copy's rounding is as large as the smallest sigmas.
    fully_shard(net, mesh=mesh, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False))
    if hasattr(net, "logits"):   # CriticWithHead's GAN pass, called outside forward
        register_fsdp_forward_method(net, "logits")
    return net


@contextlib.contextmanager
def ema_weights(net: nn.Module, ema):
    """`net` computing with the weights of `ema` (diffusers' EMAModel; None: its own) inside the
    block and exactly its own after it. Sharded, the root is resharded on the way in and out:
    FSDP2 keeps the root's weights gathered after a no-grad forward (only a backward reshards
    them), so a swap that did not reshard would miss the weights the next forward uses."""
    sharded = is_sharded(net)
    if sharded:
        net.reshard()
    params = list(net.parameters())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield net
    finally:
        if sharded:
            net.reshard()
        if ema is not None:
            ema.restore(params)


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def full_state_dict(net: nn.Module) -> dict:
    """The whole state dict on process 0 (CPU tensors), {} on the others; every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(**OPTIONS))


def full_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's whole state, keyed by parameter name, on process 0; every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=StateDictOptions(**OPTIONS))


def load_state_dict(net: nn.Module, state: dict, strict: bool = True, broadcast: bool = True) -> None:
    """Load a whole state dict into a sharded network; every process calls it. broadcast:
    process 0's `state` is sent to the others (they may pass {}); else each passes its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast,
                                                              strict=strict))


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(net, opt, state, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every process calls it); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` sharded as `param` is (this process's part of it), or as it is for a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full.to(param.device, param.dtype)
    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
