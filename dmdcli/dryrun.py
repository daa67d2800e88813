"""`dmd distill --dry-run`: what a recipe will cost before it runs (parameters; weights,
gradients, optimiser state and activations per GPU, and the cards that fits; network passes
per iteration)."""

from __future__ import annotations

import torch

from .recipe import Recipe

GiB = 1024 ** 3
FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")   # besides the real score


def size(n: int) -> str:
    """Bytes as GiB, or MiB under one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def passes_per_iteration(r: Recipe, conditional: bool) -> list[str]:
    """The network passes of one iteration, in the trainer's order (SPEC sections 2-6)."""
    b, k = r.train.batch_size, r.train.critic_steps_per_generator_step
    cfg = 2 if (r.teacher.guidance != 1.0 and conditional) else 1
    gan = r.gan.generator_weight > 0 or r.gan.critic_weight > 0
    sim = len(r.student.timesteps) - 1
    reg = (r.regression.batch_size or b) if r.regression.pairs else 0
    gen = [f"generator forward+backward at batch {b + reg}" + (f" ({reg} of them regression pairs)" if reg else ""),
           f"real score forward at batch {cfg * b}" + (" (guidance: conditional and unconditional)" if cfg == 2 else ""),
           f"critic forward at batch {b}"]
    if gan and r.gan.generator_weight > 0:
        gen.append(f"critic + GAN head forward+backward at batch {b} (generator's GAN loss)")
    if sim:
        gen.insert(0, f"up to {sim} generator forward(s) without gradients (backward simulation)")
    critic = [f"generator forward without gradients at batch {b} (not in generator turns: their samples serve)",
              f"critic forward+backward at batch {2 * b if gan else b}" + (" (fake and real)" if gan else "")]
    return ([f"every iteration (critic step): {'; '.join(critic)}"] +
            [f"{f'every {k} iterations' if k > 1 else 'every iteration'} (generator step): {'; '.join(gen)}"])


def _condition(teacher, n: int):
    """Meta-device conditions of the networks' shape: labels, text embeddings or None."""
    if teacher.num_classes:
        return torch.zeros(n, dtype=torch.long, device="meta")
    shape = getattr(teacher, "condition_shape", None)   # SD3: its packed text condition
    encoder = getattr(teacher, "text_encoder", None)
    if shape is not None:
        return torch.empty(n, *shape, device="meta")
    if encoder is not None:
        return torch.empty(n, encoder.config.max_position_embeddings, encoder.config.hidden_size, device="meta")
    return None


def _inputs(teacher, n: int):
    return (torch.empty(n, *teacher.sample_shape, device="meta"), torch.zeros(n, dtype=torch.long, device="meta"),
            _condition(teacher, n))


def state_bytes(r: Recipe, generator, critic) -> dict[str, int]:
    """Bytes of the trainable networks' fp32 weights, their gradients, AdamW's state (two
    moments and a step per tensor) and the EMA copies, as the trainer holds them."""
    nets = (generator, critic)
    trained = [p for net in nets for p in net.parameters() if p.requires_grad]
    return {"weights": sum(_bytes(net) for net in nets),
            "gradients": sum(p.numel() * 4 for p in trained),
            "AdamW state": sum(p.numel() * 8 + 4 for p in trained),
            "EMA": (_bytes(generator) if r.train.ema_decay > 0 else 0)
            + (_bytes(critic) if r.train.critic_ema_decay > 0 else 0)}


def activation_bytes(r: Recipe, teacher, generator, critic) -> dict[str, int]:
    """Activations autograd keeps in each turn at the recipe's batch (dmdcli/memory.py): the
    generator's forward (regression pairs included) plus, with the GAN, the critic's pass to
    its bottleneck that the generator's GAN loss backpropagates through; the critic's forward
    on fakes (and reals up to the bottleneck with the GAN)."""
    from .memory import saved_bytes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.train.mixed_precision)
    b = r.train.batch_size
    reg = (r.regression.batch_size or b) if r.regression.pairs else 0
    gan_g = r.gan.generator_weight > 0

    def generator_turn():
        generator(*_inputs(teacher, b + reg))
        if gan_g:
            critic.logits(*_inputs(teacher, b))

    def critic_turn():
        if hasattr(critic, "head"):
            critic(*_inputs(teacher, b), real=_inputs(teacher, b))
        else:
            critic(*_inputs(teacher, b))

    return {"generator turn": saved_bytes(generator_turn, [generator, critic], dtype),
            "critic turn": saved_bytes(critic_turn, [critic], dtype)}


def _networks(r: Recipe, teacher, stop_at_bottleneck: bool = True):
    """The generator and the critic as the trainer makes them, on the meta device (sharded
    runs pass the whole critic for the GAN's logits: stop_at_bottleneck False)."""
    from .networks import CriticWithHead, add_lora, enable_gradient_checkpointing
    from .teachers import make_student

    generator, critic = make_student(teacher, r).to("meta"), teacher.make_critic().to("meta")
    if r.train.lora_rank:
        add_lora(critic, r.train.lora_rank)
    if r.train.gradient_checkpointing:
        for net in (generator, critic):
            enable_gradient_checkpointing(net)
    if r.gan.generator_weight > 0 or r.gan.critic_weight > 0:
        with torch.device("meta"):
            critic = CriticWithHead(critic, stop_at_bottleneck=stop_at_bottleneck)
    return generator, critic


def _verdict(peak: int, r: Recipe, floor: int) -> str:
    """Which cards it fits (40, 80 and 141 GB), with a tenth of each kept for the CUDA context,
    the backward pass's transient buffers and the allocator's slack; what to change where it
    fits none. floor: the bytes no batch size changes (weights, gradients, optimiser state)."""
    fits = [gb for gb in (40, 80, 141) if peak <= 0.9 * gb * GiB]
    if fits[:2] == [40, 80]:
        return "fits 40 GB and 80 GB cards"
    if fits[:1] == [80]:
        return "fits an 80 GB card, not a 40 GB one"
    if not r.train.gradient_checkpointing:
        fix = "set train.gradient_checkpointing = true"
    elif r.train.batch_size > 1 and floor <= 0.8 * 80 * GiB:
        fix = "set a smaller train.batch_size"
    else:   # the weights, gradients and AdamW state alone fill the card
        fix = "train LoRA adapters (train.lora_rank)" if not r.train.lora_rank else "shard it across GPUs"
    if fits == [141]:
        return f"fits a 141 GB card (H200), not an 80 GB one: for 80 GB cards, {fix}"
    return f"does not fit a 141 GB card: {fix}"


def estimate(r: Recipe, teacher, generator=None, critic=None) -> tuple[dict, dict, int]:
    """(state bytes by kind, frozen networks included; activation bytes by turn; the peak per
    process). Each turn holds its own network's gradients only (the other's are freed before),
    so the peak is the state without gradients plus the larger turn's gradients and activations."""
    if generator is None:
        generator, critic = _networks(r, teacher)
    state = state_bytes(r, generator, critic)
    state["frozen"] = _bytes(getattr(teacher, "real", None)) + sum(
        _bytes(getattr(teacher, name, None)) for name in FROZEN_PARTS)
    acts = activation_bytes(r, teacher, generator, critic)
    grads = {"generator turn": sum(p.numel() * 4 for p in generator.parameters() if p.requires_grad),
             "critic turn": sum(p.numel() * 4 for p in critic.parameters() if p.requires_grad)}
    peak = sum(state.values()) - state["gradients"] + max(grads[k] + acts[k] for k in acts)
    return state, acts, peak


def sharded_peak(r: Recipe, state: dict, acts: dict, generator, critic, processes: int) -> int:
    """The peak per process with generator and critic sharded over `processes` (FSDP2,
    dmdcli/sharding.py): their weights, gradients, AdamW state and EMA divided among the
    processes (in a generator turn with the GAN, the critic's gradients too: it is not frozen
    there); the frozen networks and the activations (`acts`: measured with the whole critic
    passed for the GAN's logits, as sharded runs do) whole on each; plus what FSDP2 holds
    whole at once: both roots' layers (kept gathered), the two largest blocks (the one running
    and the one prefetched) and, in backward, the largest block's unsharded gradients and its
    fp32 reduce-scatter buffer. Gathers are bf16 under mixed precision bf16."""
    from .sharding import blocks

    unit_bytes = 2 if r.train.mixed_precision == "bf16" else 4
    sizes = {id(net): sorted((_params(b) for b in blocks(net)), reverse=True) for net in (generator, critic)}
    roots = sum(_params(net) - sum(sizes[id(net)]) for net in (generator, critic))
    largest = max((v for s in sizes.values() for v in s[:1]), default=0)
    running = max(sum(s[:2]) for s in sizes.values())
    gathered = (roots + running) * unit_bytes + largest * (unit_bytes + 4)
    grad_g = sum(p.numel() * 4 for p in generator.parameters() if p.requires_grad)
    grad_c = sum(p.numel() * 4 for p in critic.parameters() if p.requires_grad)
    grads = max(grad_g + (grad_c if r.gan.generator_weight > 0 else 0), grad_c)
    trained = sum(v for k, v in state.items() if k not in ("frozen", "gradients"))
    return (trained + grads) // processes + state["frozen"] + max(acts.values()) + gathered


def report(r: Recipe) -> str:
    """Parameter counts; weights, gradients, optimiser state and activations per process; the
    cards that fits; passes per iteration. A recipe's published teacher that is not on this
    machine is measured from its architecture alone (teachers/architectures.py)."""
    from .utils.errors import UserError
    from .teachers import build_teacher
    from .teachers.architectures import architecture_only

    note = ""
    try:
        teacher = build_teacher(r.teacher)
    except (UserError, OSError, ValueError, KeyError) as e:   # the recipe still printed; say why no figures
        teacher = architecture_only(r.teacher)
        if teacher is None:
            return f"# dry run: no estimate, the teacher cannot be loaded: {str(e).splitlines()[0] if str(e) else e!r}\n"
        note = f"# measured on {teacher.what}\n"
    generator, critic = _networks(r, teacher)
    real = getattr(teacher, "real", None)
    extras = {name: getattr(teacher, name, None) for name in FROZEN_PARTS}
    n_gen, n_critic = _params(generator), _params(critic)
    state, acts, peak = estimate(r, teacher, generator, critic)
    gan = hasattr(critic, "head")
    # Sharded, the GAN's logits pass the whole critic (FSDP2 cannot stop at the bottleneck).
    whole_acts = activation_bytes(r, teacher, generator, _networks(r, teacher, stop_at_bottleneck=False)[1]) \
        if gan else acts
    ckpt = "on" if r.train.gradient_checkpointing else "off"
    lines = ["# dry run: nothing was trained",
             f"# parameters: generator {n_gen:,}, critic {n_critic:,}" + (" (GAN head included)" if gan else "")
             + (f", real score {_params(real):,} (frozen)" if real is not None else ", real score exact (no network)")
             + "".join(f", {n} {_params(m):,} (frozen)" for n, m in extras.items() if m is not None),
             "# memory per process: " + ", ".join(f"{k} {size(v)}" for k, v in state.items() if v)
             + " (generator and critic in fp32; frozen networks in their dtype)",
             f"# activations at batch {r.train.batch_size} (mixed_precision {r.train.mixed_precision}, "
             f"gradient checkpointing {ckpt}): " + ", ".join(f"{k} {size(v)}" for k, v in acts.items()),
             f"# peak per process: about {size(peak)}: {_verdict(peak, r, peak - max(acts.values()))}"
             + (" (unsharded; train.sharding = 'fsdp2' below)" if r.train.sharding == "fsdp2" else ""),
             "# sharded with train.sharding = 'fsdp2' (generator and critic state split, frozen networks whole): "
             "peak per process about " + ", ".join(
                 f"{size(sharded_peak(r, state, whole_acts, generator, critic, n))} over {n}" for n in (2, 4, 8))]
    if r.train.lora_rank:
        lines.append("# train.lora_rank: only the adapters have gradients and AdamW state")
    lines += [f"# {line}" for line in passes_per_iteration(r, bool(teacher.num_classes) or teacher.name == "sd")]
    return note + "\n".join(lines) + "\n"
