"""A DMDTrainer's checkpoints: write one (all processes take part, process 0 writes the
weights), read one back to the bit. Sharded runs (dmdcli/sharding.py) gather their networks
and optimiser states whole first, so every checkpoint has the same files whatever the launch."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import sharding
from .utils import checkpoint
from .utils.errors import UserError


def _weights(trainer, net) -> dict:
    """A network's whole state dict on process 0 (gathered under sharding: every process calls)."""
    if trainer.sharded:
        return sharding.full_state_dict(net)
    return trainer.acc.unwrap_model(net).state_dict() if trainer.acc.is_main_process else {}


def _optimizer(trainer, net, opt) -> dict:
    # An optimiser that has not stepped yet is saved as it is: torch's gather would first take a
    # zero step to create its state, and AdamW's next step would count from 2.
    if trainer.sharded and opt.state:
        return sharding.full_optimizer_state(net, opt)
    return opt.state_dict() if trainer.acc.is_main_process else {}


def save(trainer) -> Path | None:
    acc, r = trainer.acc, trainer.recipe
    if acc.is_main_process:
        checkpoint.begin(trainer.run_dir, trainer.step)
    acc.wait_for_everyone()
    tmp = checkpoint.tmp_path(trainer.run_dir, trainer.step)
    checkpoint.save_tree(tmp, f"rng-rank{acc.process_index}", {
        "rng": trainer.rng.get_state(), "data_rng": trainer.data_rng.get_state(), "torch": torch.get_rng_state()})
    generator, critic = _weights(trainer, trainer.generator), _weights(trainer, trainer.critic)
    ema = ema_state_dict(trainer) if trainer.ema is not None and (trainer.sharded or acc.is_main_process) else None
    opt_g, opt_c = _optimizer(trainer, trainer.generator, trainer.opt_g), _optimizer(trainer, trainer.critic, trainer.opt_c)
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        save_file(generator, str(tmp / "generator.safetensors"))
        save_file(critic, str(tmp / "critic.safetensors"))
        if ema is not None:
            save_file(ema, str(tmp / "generator_ema.safetensors"))
        if trainer.critic_ema is not None:
            save_file(trainer.critic_ema.state_dict(), str(tmp / "critic_ema.safetensors"))
        checkpoint.save_tree(tmp, "state", {
            "step": trainer.step, "num_processes": acc.num_processes, "sharding": r.train.sharding,
            "opt_g": opt_g, "opt_c": opt_c,
            "sched_g": trainer.sched_g.state_dict(), "sched_c": trainer.sched_c.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            # The EMA's weights are generator_ema.safetensors; only its counters go here.
            "ema": {k: v for k, v in trainer.ema.state_dict().items() if k != "shadow_params"}
            if trainer.ema is not None else None})
        final = checkpoint.commit(tmp, trainer.step, r.run.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def _load_weights(trainer, net, file: Path) -> None:
    if trainer.sharded:   # process 0 reads; the others receive their shards
        sharding.load_state_dict(net, load_file(str(file)) if trainer.acc.is_main_process else {})
    else:
        trainer.acc.unwrap_model(net).load_state_dict(load_file(str(file)))


def load(trainer, ckpt: Path) -> None:
    acc = trainer.acc
    state = checkpoint.load_tree(ckpt, "state")
    # Checkpoints of earlier versions lack later keys: their number of processes is the
    # number of RNG files, and they had no scaler, EMA state or sharding.
    state.setdefault("num_processes", len(list(ckpt.glob("rng-rank*.safetensors"))))
    state.setdefault("scaler", None)
    state.setdefault("sharding", "none")
    if state["num_processes"] != acc.num_processes:
        raise UserError(f"{ckpt} was written by {state['num_processes']} process(es) and this run has "
                        f"{acc.num_processes}; resume with the same number (accelerate launch --num_processes)")
    if state["sharding"] != trainer.recipe.train.sharding:
        raise UserError(f"{ckpt} was written with train.sharding = {state['sharding']!r} and this run has "
                        f"{trainer.recipe.train.sharding!r}; resume with the same setting")
    _load_weights(trainer, trainer.generator, ckpt / "generator.safetensors")
    _load_weights(trainer, trainer.critic, ckpt / "critic.safetensors")
    if trainer.ema is not None and state.get("ema") is None:
        raise UserError(f"{ckpt} holds no EMA state, and this recipe keeps one (train.ema_decay); "
                        f"start a new run (--set run.out=...)")
    if trainer.critic_ema is not None:
        if not (ckpt / "critic_ema.safetensors").is_file():
            raise UserError(f"{ckpt} holds no critic EMA, and this recipe keeps one (train.critic_ema_decay); "
                            f"start a new run (--set run.out=...)")
        trainer.critic_ema.load_state_dict(load_file(str(ckpt / "critic_ema.safetensors")))
    if trainer.sharded:
        main = acc.is_main_process
        for net, opt, key in ((trainer.generator, trainer.opt_g, "opt_g"), (trainer.critic, trainer.opt_c, "opt_c")):
            if state[key]["state"]:   # (every process reads the same state file: they agree)
                sharding.load_optimizer_state(net, opt, state[key] if main else {})
    else:
        trainer.opt_g.load_state_dict(state["opt_g"])
        trainer.opt_c.load_state_dict(state["opt_c"])
    trainer.sched_g.load_state_dict(state["sched_g"])
    trainer.sched_c.load_state_dict(state["sched_c"])
    if trainer.ema is not None:
        weights = load_file(str(ckpt / "generator_ema.safetensors"))
        params = list(acc.unwrap_model(trainer.generator).named_parameters())
        trainer.ema.load_state_dict({**state["ema"], "shadow_params": [sharding.like(weights[n], p) for n, p in params]})
        trainer.ema.min_decay = trainer.recipe.train.ema_decay   # checkpoints of 0.1 kept diffusers' warm-up
        trainer.ema.to(acc.device)   # EMAModel keeps what it was given (here: CPU tensors)
    if state["scaler"] is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    trainer.step = state["step"]
    rng = checkpoint.load_tree(ckpt, f"rng-rank{acc.process_index}")
    trainer.rng.set_state(rng["rng"])
    trainer.data_rng.set_state(rng["data_rng"])
    torch.set_rng_state(rng["torch"])


def ema_state_dict(trainer) -> dict:
    """The generator's state dict with the EMA weights in place of its parameters (whole, on
    process 0, under sharding: every process calls it there)."""
    net = trainer.acc.unwrap_model(trainer.generator)
    state = _weights(trainer, net) if trainer.sharded else {k: v.detach().clone() for k, v in net.state_dict().items()}
    for (name, _), shadow in zip(net.named_parameters(), trainer.ema.shadow_params):
        whole = sharding.full_tensor(shadow.detach())
        if name in state:
            state[name] = whole.to(state[name].device, state[name].dtype, copy=True)
    return state
