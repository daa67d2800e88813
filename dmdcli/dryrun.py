"""`dmd distill --dry-run`: what a recipe will cost before it runs (parameters, memory of the
weights and optimiser state per GPU, network passes per iteration)."""

from __future__ import annotations

from .recipe import Recipe

GiB = 1024 ** 3


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


def report(r: Recipe) -> str:
    """Parameter counts, weight and optimiser memory per process, passes per iteration. The
    teacher is loaded once; the generator and critic are counted from it, not copied."""
    from .utils.errors import UserError
    from .networks import GANHead, bottleneck
    from .teachers import build_teacher

    try:
        teacher = build_teacher(r.teacher)
    except (UserError, OSError, ValueError, KeyError) as e:   # the recipe still printed; say why no figures
        return f"# dry run: no estimate, the teacher cannot be loaded: {str(e).splitlines()[0] if str(e) else e!r}\n"
    real = getattr(teacher, "real", None)
    shape = real if real is not None else teacher.make_generator()   # the exact teacher has no network
    n_net = _params(shape)
    gan = r.gan.generator_weight > 0 or r.gan.critic_weight > 0
    n_head = _params(GANHead(*bottleneck(shape)[1:])) if gan else 0
    extras = {name: getattr(teacher, name, None) for name in ("vae", "text_encoder")}
    # fp32 weights + fp32 gradients + AdamW's two moments: 16 bytes per trainable parameter.
    trainable = 16 * (2 * n_net + n_head)
    frozen = _bytes(real) + sum(_bytes(m) for m in extras.values())
    ema = 4 * n_net if r.train.ema_decay > 0 else 0
    lines = ["# dry run: nothing was trained",
             f"# parameters: generator {n_net:,}, critic {n_net + n_head:,}"
             + (" (GAN head included)" if gan else "")
             + (f", real score {n_net:,} (frozen)" if real is not None else ", real score exact (no network)")
             + "".join(f", {n} {_params(m):,} (frozen)" for n, m in extras.items() if m is not None),
             f"# memory per process for weights, gradients and AdamW state: {(trainable + frozen + ema) / GiB:.2f} GiB"
             f" (trainable 16 bytes a parameter{', EMA 4' if ema else ''}; frozen in their dtype);"
             f" activations come on top and grow with train.batch_size"
             + ("; gradient checkpointing is on" if r.train.gradient_checkpointing else
                "; train.gradient_checkpointing = true trades time for activation memory" if real is not None else "")]
    if r.train.lora_rank:
        lines.append("# train.lora_rank: only the adapters train, so the optimiser part of the figure above "
                     "(12 of its 16 bytes a trainable parameter) shrinks to the adapters' size")
    lines += [f"# {line}" for line in passes_per_iteration(r, bool(teacher.num_classes) or teacher.name == "sd")]
    return "\n".join(lines) + "\n"
