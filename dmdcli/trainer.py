"""The DMD training step on accelerate: generator, frozen real score (the teacher), critic,
and their checkpoints. dmdcli/runner.py runs it.

Every iteration the critic (fake score) takes one step on fresh generator samples; the
generator steps once every `critic_steps_per_generator_step` iterations after
`critic_warmup_steps` (DMD2's two time-scale rule; DMD v1 is ratio 1 plus regression).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from diffusers.optimization import get_scheduler
from transformers.optimization import get_wsd_schedule
from diffusers.training_utils import EMAModel

from .utils import checkpoint
from . import losses, sharding, training_state
from .utils.errors import UserError
from .real_data import RealData
from .networks import CriticWithHead, add_lora, enable_gradient_checkpointing, frozen
from .pairs import PairSet
from .perceptual import load_lpips, lpips_distance
from .recipe import Recipe
from .sampling import generator_x0, student_sample
from .teachers import build_teacher, make_student, real_score


def uses_gan(recipe: Recipe) -> bool:
    return recipe.gan.generator_weight > 0 or recipe.gan.critic_weight > 0


# The other ranks wait in a collective while rank 0 writes a checkpoint (about 21 GB for SD1.5's
# generator, critic and optimiser states): torch's default of 10 minutes (30 on some builds)
# would end a run on a slow file system.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator (DMDTrainer refuses sharded launches before loading anything)."""
    # With the GAN head, a critic pass that needs no logits leaves the head unused. Gradients as
    # views of DDP's buckets: one copy of them less, and no copy into the buckets.
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=uses_gan(recipe), gradient_as_bucket_view=True),
              InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)]
    cuda = torch.cuda.is_available()
    if cuda and recipe.train.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision = 'bf16' but this GPU has no bf16 (before Ampere); set it to 'no' "
                        "(fp16 diverged in the authors' runs)")
    if cuda:
        cuda_speed_settings()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe.train.mixed_precision,
                       kwargs_handlers=kwargs, log_with=_tracker(recipe.run.log_with), project_dir=recipe.run.out)


def cuda_speed_settings() -> None:
    """The standard speed settings on CUDA: TF32 matmuls and convolutions (bf16-level
    precision is what the recipes train at anyway) and cuDNN's autotuner (fixed shapes)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def adamw(params, lr: float, recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the recipe's betas and weight decay; the fused kernel on CUDA (one launch
    for all parameters instead of a loop)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(recipe.train.betas), weight_decay=recipe.train.weight_decay,
                             fused=device.type == "cuda" or None)


def lr_schedule(opt, t, iterations: int):
    """Linear warm-up over t.warmup_steps, then constant; with t.lr_decay_steps, the last that
    many of `iterations` decay linearly to zero (warm-up, stable, decay: transformers' WSD)."""
    if not t.lr_decay_steps:
        return get_scheduler("constant_with_warmup", opt, num_warmup_steps=t.warmup_steps)
    return get_wsd_schedule(opt, num_warmup_steps=t.warmup_steps, num_decay_steps=t.lr_decay_steps,
                            num_training_steps=iterations, decay_type="linear")


class DMDTrainer:
    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None):
        self.recipe = r = recipe
        self.run_dir = Path(r.run.out)
        self.gan = uses_gan(r)
        self.acc = accelerator or make_accelerator(r)
        refuse_sharding(self.acc)
        self.sharded = r.train.sharding == "fsdp2"
        if self.sharded:
            sharding.check(r, self.acc.num_processes)
        device = self.acc.device
        self.teacher = build_teacher(r.teacher).to(device)
        self.schedule = self.teacher.schedule
        self.pairs = PairSet(r.regression.pairs, self.teacher) if r.regression.pairs else None
        if self.pairs is not None and self.pairs.manifest["guidance"] != r.teacher.guidance:
            raise UserError(f"pairs in {r.regression.pairs} were made at guidance {self.pairs.manifest['guidance']} "
                            f"and the recipe's teacher uses {r.teacher.guidance}; make pairs with `dmd make-pairs "
                            f"--recipe RECIPE` (it takes the recipe's guidance)")
        self.lpips = load_lpips(r.regression.lpips_weights, device) \
            if self.pairs is not None and r.regression.distance == "lpips" else None
        torch.manual_seed(r.run.seed)  # network initialisation
        generator, critic = make_student(self.teacher, r), self.teacher.make_critic()
        self.teacher.release_trainable()
        if r.train.lora_rank:
            add_lora(critic, r.train.lora_rank)
        if r.train.gradient_checkpointing:
            for net in (generator, critic):
                if not enable_gradient_checkpointing(net):
                    raise UserError(f"train.gradient_checkpointing: the {r.teacher.name} teacher's networks "
                                    f"have no checkpointing (they are small); set it to false")
        # Optional EMA of the critic's network: the DM loss reads its fake score from these weights
        # while the critic trains on as before. It fits a frozen generator better at high noise
        # (bench/critic_fit.py), but made Fashion-MNIST's DMD2 worse (BENCHMARKS.md): off by default.
        self.critic_ema = copy.deepcopy(critic).requires_grad_(False).eval().to(device) \
            if r.train.critic_ema_decay > 0 else None
        self.real = None
        if self.gan:
            # Sharded, a pass for the GAN logits runs the whole critic: FSDP2 cannot stop mid-forward.
            critic = CriticWithHead(critic, stop_at_bottleneck=not self.sharded)
            self.real = RealData(self.teacher, r.gan.dataset)
        if self.sharded:   # before the optimisers: they hold the sharded parameters
            generator, critic = (sharding.shard(net, device, r.train.mixed_precision) for net in (generator, critic))
        opt_g = adamw([p for p in generator.parameters() if p.requires_grad], r.train.lr_generator, r, device)
        opt_c = adamw([p for p in critic.parameters() if p.requires_grad], r.train.lr_critic, r, device)
        # Schedulers stay unprepared: accelerate would step them once per process.
        # The generator's counts from its first turn (train_step), the critic's from the first iteration.
        self.sched_g = lr_schedule(opt_g, r.train, r.train.steps - r.train.critic_warmup_steps)
        self.sched_c = lr_schedule(opt_c, r.train, r.train.steps)
        self.generator, self.critic, self.opt_g, self.opt_c = (generator, critic, opt_g, opt_c) if self.sharded \
            else self.acc.prepare(generator, critic, opt_g, opt_c)
        # Optional EMA of the generator's weights (SPEC section 7: peers use it; the authors did not).
        # min_decay = decay: diffusers otherwise caps the decay at (1 + n) / (10 + n) after n
        # steps (0.985 at 600 generator steps for a recipe's 0.995). The generator starts from
        # the teacher's weights, not noise, so the EMA needs no warm-up.
        self.ema = EMAModel(self.acc.unwrap_model(self.generator).parameters(), decay=r.train.ema_decay,
                            min_decay=r.train.ema_decay) if r.train.ema_decay > 0 else None
        # Every rank draws the whole global batch from the same generators and keeps its slice
        # (_draw), so a run depends on the global batch only, not on how many processes share it.
        seed = r.run.seed * 1000
        self.rng = torch.Generator(device=device).manual_seed(seed)       # noise, timesteps, labels
        self.data_rng = torch.Generator().manual_seed(seed + 1)          # pair indices, real data
        self.step = 0
        # A stop asked of this process (the runner sets it from its signal handler) rides on the
        # finite check's all-reduce, so every rank learns of it without a collective of its own.
        self.stop_requested = False
        self.stopping = False   # some process was asked: all of them stop after this iteration
        self._for_critic = None   # (samples, condition) of this iteration's generator turn

    # -- one iteration's pieces -------------------------------------------------------------
    def _draw(self, make, n: int):
        """make(m) draws m rows (a tensor, a tuple of them, or None); this rank's n of the
        global world x n."""
        world, rank = self.acc.num_processes, self.acc.process_index
        out = make(world * n)
        if world == 1 or out is None:
            return out
        cut = (lambda v: v[rank * n:(rank + 1) * n] if v is not None else None)
        return tuple(cut(v) for v in out) if isinstance(out, tuple) else cut(out)

    def _rows(self, read, n: int):
        """read(m, keep) draws the indices of m rows and reads only the `keep` ones: this
        rank's n of the global world x n, read from disk by this rank alone."""
        world, rank = self.acc.num_processes, self.acc.process_index
        return read(world * n, slice(rank * n, (rank + 1) * n))

    def _randn(self, shape) -> torch.Tensor:
        return self._draw(lambda m: torch.randn(m, *shape[1:], generator=self.rng, device=self.acc.device), shape[0])

    def _timesteps(self, draw, n: int) -> torch.Tensor:
        return self._draw(lambda m: draw(m, self.schedule.num_train_timesteps, self.rng, self.acc.device), n)

    def _noise(self, n: int) -> torch.Tensor:
        return self._randn((n, *self.teacher.sample_shape))

    def _backward_simulate(self, z, cond):
        """Input and timestep for the generator: pure noise at timesteps[0] or, for few-step
        students, DMD2's backward simulation to a step index shared by all ranks."""
        ts = self.recipe.student.timesteps
        k = int(torch.randint(len(ts), (1,), generator=torch.Generator().manual_seed(
            self.recipe.run.seed * 7919 + self.step))) if len(ts) > 1 else 0
        renoise = [self._randn(z.shape) for _ in range(k - 1)]
        with self.acc.autocast():   # as every other pass (sharded bf16 weights take no fp32 input)
            x = student_sample(self.acc.unwrap_model(self.generator), self.schedule, z, cond, ts[:k],
                               renoise=renoise) if k else z * self.schedule.init_noise_sigma
        if k:
            x = self.schedule.add_noise(x, self._randn(x.shape),
                                        torch.full((len(x),), ts[k], device=x.device, dtype=torch.long))
        return x, torch.full((len(z),), ts[k], device=z.device, dtype=torch.long)

    def _fake_score(self, x_t, t, cond) -> torch.Tensor:
        """The critic's x0 for the DM loss: from the critic's EMA weights if the recipe keeps them."""
        if self.critic_ema is None:
            return self._critic(x_t, t, cond)[0]
        return self.schedule.to_x0(self.critic_ema(x_t, t, cond), x_t, t, self.critic_ema.prediction_type)

    def _critic(self, x_t, t, cond, real=None):
        """(x0 prediction, raw prediction, GAN logits or None) of the critic; with `real`
        (x_r, t_r, cond_r), the reals' logits follow the fakes'."""
        out = self.critic(x_t, t, cond, real) if real is not None else self.critic(x_t, t, cond)
        pred, logits = out if self.gan else (out, None)
        net = self.acc.unwrap_model(self.critic)
        return self.schedule.to_x0(pred, x_t, t, net.prediction_type), pred, logits

    def _generator_inputs(self, n: int):
        labels = self._draw(lambda m: self.teacher.random_labels(m, self.rng), n)
        cond = self.teacher.encode_condition(labels)
        x_in, t_in = self._backward_simulate(self._noise(n), cond)
        return x_in, t_in, cond

    def _fake_samples(self, n: int, grad: bool):
        x_in, t_in, cond = self._generator_inputs(n)
        with torch.set_grad_enabled(grad), self.acc.autocast():
            x = generator_x0(self.generator, self.schedule, x_in, t_in, cond)
        return x, cond

    def generator_step(self) -> dict:
        r = self.recipe
        x_in, t_in, cond = self._generator_inputs(r.train.batch_size)
        n = len(x_in)
        if self.pairs is not None:
            # DMD v1's regression (or DMD2 given pairs): the regression batch (pair noise at the
            # first timestep) rides in the same forward pass, so DDP sees one forward per backward.
            z, y, labels = self._rows(lambda m, keep: self.pairs.batch(m, self.data_rng, keep),
                                      r.regression.batch_size or r.train.batch_size)
            z, y = z.to(x_in.device) * self.schedule.init_noise_sigma, y.to(x_in.device)
            cond_p = self.teacher.encode_condition(labels.to(x_in.device) if labels is not None else None)
            x_in = torch.cat([x_in, z])
            t_in = torch.cat([t_in, torch.full((len(z),), r.student.timesteps[0], device=z.device, dtype=torch.long)])
            cond = torch.cat([cond, cond_p]) if cond is not None else None
        with self.acc.autocast():
            out = generator_x0(self.generator, self.schedule, x_in, t_in, cond)
        x, cond = out[:n], (cond[:n] if cond is not None else None)
        self._for_critic = (x.detach(), cond)   # this iteration's critic trains on these (as the authors' loop)
        first, last = r.train.dm_timesteps
        t = self._timesteps(partial(losses.dm_timesteps, first=first, last=last), n)
        x_t = self.schedule.add_noise(x.detach(), self._randn(x.shape), t)
        with torch.no_grad(), self.acc.autocast():
            x0_real = real_score(self.teacher, x_t, t, cond, r.teacher.guidance, r.teacher.guidance_interval)
            x0_fake = self._fake_score(x_t, t, cond)
        loss_dm, non_finite = losses.distribution_matching_loss(x, x0_real, x0_fake)
        loss, logs = r.train.dm_weight * loss_dm, {"loss_dm": loss_dm.detach(), "dm_non_finite": non_finite}
        if self.gan and r.gan.generator_weight > 0:
            # Diffusion GAN: the generator's output noised at t uniform in [0, T), through the critic.
            t_g = self._timesteps(losses.critic_timesteps, n)
            eps_g = self._randn(x.shape)
            # The critic is frozen for this pass and stops at its bottleneck (the head reads
            # nothing later): the generator's GAN loss builds no gradients for the critic.
            # (Sharded, its parameters stay as they are: FSDP2 keeps requires_grad from the start,
            # and critic_step drops what this pass leaves in its gradients.)
            critic = self.acc.unwrap_model(self.critic)
            with frozen(critic) if not self.sharded else contextlib.nullcontext(), self.acc.autocast():
                logits = critic.logits(self.schedule.add_noise(x, eps_g, t_g), t_g, cond)
            loss_gan = losses.gan_generator_loss(logits)
            loss = loss + r.gan.generator_weight * loss_gan
            logs["loss_gan_g"] = loss_gan.detach()
        if self.pairs is not None:
            loss_reg = self._regression(out[n:], y)
            loss = loss + r.regression.weight * loss_reg
            logs["loss_reg"] = loss_reg.detach()
        if not self._finite(loss, "generator"):
            self.opt_g.zero_grad(set_to_none=True)
            return {"skipped_generator": 1}
        self.acc.backward(loss)
        logs["grad_norm_g"] = sharding.full_tensor(
            self.acc.clip_grad_norm_(self.generator.parameters(), r.train.grad_clip or float("inf")).detach())
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.acc.unwrap_model(self.generator).parameters())
        return logs

    def _regression(self, pred, y, chunk: int = 8) -> torch.Tensor:
        """DMD eq. 9's d(G(z), y): LPIPS on decoded images (the paper's), or a distance on samples.
        LPIPS runs `chunk` samples at a time under activation checkpointing: the decode and the
        VGG pass keep only their inputs, and backward recomputes one chunk at a time (decoding
        a whole SD batch at 512 px with gradients needs tens of GB)."""
        if self.lpips is None:
            return losses.regression_loss(pred, y, self.recipe.regression.distance)
        from torch.utils.checkpoint import checkpoint

        def part(p, t):
            with torch.no_grad():   # both sides decoded alike, so d(y, y) = 0
                target = self.teacher.images_with_grad(t)
            return lpips_distance(self.lpips, self.teacher.images_with_grad(p), target) * len(p)

        return sum(checkpoint(part, p, t, use_reentrant=False)
                   for p, t in zip(pred.split(chunk), y.split(chunk))) / len(pred)

    def critic_step(self) -> dict:
        r = self.recipe
        self.opt_c.zero_grad(set_to_none=True)   # drop what the generator's GAN loss left here
        # In a generator turn, the samples the generator just made (before its update): no second
        # generator forward. In the critic's own turns, fresh ones.
        reuse, self._for_critic = self._for_critic, None
        x, cond = reuse if reuse is not None else self._fake_samples(r.train.batch_size, grad=False)
        n = len(x)
        t = self._timesteps(losses.critic_timesteps, n)
        eps = self._randn(x.shape)
        x_t = self.schedule.add_noise(x, eps, t)
        real = None
        if self.gan:
            # Real data, noised at its own t, in the same call as the fakes (to the bottleneck only).
            images, labels = self._rows(lambda m, keep: self.real.batch(m, self.data_rng, keep, x.device), n)
            t_r = self._timesteps(losses.critic_timesteps, n)
            real = (self.schedule.add_noise(images, self._randn(images.shape), t_r), t_r,
                    self.real.condition(labels, x.device))
        with self.acc.autocast():
            x0_pred, pred, logits = self._critic(x_t, t, cond, real)
        net = self.acc.unwrap_model(self.critic)
        if self.schedule.family != "edm":
            # The teacher's own loss: MSE on its own target (epsilon, v, flow velocity or x0), as it was trained.
            loss = losses.critic_loss_vp(pred, self.schedule.training_target(x, eps, t, net.prediction_type))
        else:
            loss = losses.critic_loss_edm(x0_pred, x, self.schedule.sigma(t), self.schedule.sigma_data)
        logs = {"loss_critic": loss.detach()}
        if self.gan:
            loss_gan = losses.gan_critic_loss(logits[:n], logits[n:])
            loss = loss + r.gan.critic_weight * loss_gan
            logs["loss_gan_c"] = loss_gan.detach()
        if not self._finite(loss, "critic"):
            self.opt_c.zero_grad(set_to_none=True)
            self.sched_c.step()   # the schedule counts iterations, skipped or not (as the generator's)
            return {"skipped_critic": 1}
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self.critic.parameters(), r.train.grad_clip or float("inf"))   # 0: off
        self.opt_c.step()
        self.sched_c.step()
        self.opt_c.zero_grad(set_to_none=True)
        if self.critic_ema is not None:
            with torch.no_grad():
                net = self.acc.unwrap_model(self.critic)
                net = net.critic if self.gan else net
                for ema, p in zip(self.critic_ema.parameters(), net.parameters()):
                    ema.lerp_(p, 1 - r.train.critic_ema_decay)
        return logs

    def _finite(self, loss: torch.Tensor, which: str) -> bool:
        """False to skip this update (train.on_non_finite = "skip"); on "stop", every rank
        stops together (not one alone, which would hang the others) on NaN or inf. The same
        all-reduce carries stop_requested into `stopping` (the critic checks every iteration)."""
        flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1),
                           torch.tensor([float(self.stop_requested)], device=loss.device)])
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags, reduction="sum")
        bad, stop = flags.tolist()   # the update's one host sync
        self.stopping = self.stopping or stop > 0
        if not bad:
            return True
        if self.recipe.train.on_non_finite == "skip":
            return False
        last = checkpoint.latest_valid(self.run_dir)
        keep = f"the last good checkpoint is kept: {last}" if last else "no checkpoint was written yet"
        raise UserError(f"the {which} loss became {loss.item()} at step {self.step}; {keep}. Start a new "
                        f"run with a lower train.lr_{which} or more train.warmup_steps "
                        f"(--set run.out=... --set train.lr_{which}=...), or set train.on_non_finite = 'skip'")

    def is_generator_turn(self) -> bool:
        t = self.recipe.train
        return self.step >= t.critic_warmup_steps and (self.step - t.critic_warmup_steps) % t.critic_steps_per_generator_step == 0

    def train_step(self) -> dict:
        """One iteration; the logged values stay tensors on the device (the runner reads them once
        per log window), so the only host syncs are the finite checks that decide an update."""
        logs = self.generator_step() if self.is_generator_turn() else {}
        logs.update(self.critic_step())
        # Both warm-ups count iterations, as train.warmup_steps says (the generator's from its
        # first turn): stepped on its turns only, TTUR 5 would warm it up five times longer.
        with warnings.catch_warnings():   # torch warns while the critic warms up alone
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            if self.step >= self.recipe.train.critic_warmup_steps:   # from the generator's first turn
                self.sched_g.step()
        self.step += 1
        return logs

    # -- state (dmdcli/training_state.py) -----------------------------------------------------
    def save(self) -> Path | None:
        return training_state.save(self)

    def load(self, ckpt: Path) -> None:
        training_state.load(self, ckpt)

    def ema_state_dict(self) -> dict:
        return training_state.ema_state_dict(self)

    # -- the run ----------------------------------------------------------------------------
    def preview(self, name: str) -> None:
        # Sharded, every process runs the generator (its blocks are gathered from all of them).
        if not self.recipe.run.preview_samples or not (self.acc.is_main_process or self.sharded):
            return
        n = min(self.recipe.run.preview_samples, self.teacher.preview_limit or self.recipe.run.preview_samples)
        g = torch.Generator(device=self.acc.device).manual_seed(12345)
        z = torch.randn(n, *self.teacher.sample_shape, generator=g, device=self.acc.device)
        labels = self.teacher.condition_ids(range(n))      # by index: one grid column per class
        labels = labels.to(self.acc.device) if labels is not None else None
        generator = self.acc.unwrap_model(self.generator)
        batch = self.teacher.preview_batch or n
        # Previews show what `sample` will use (the EMA's weights); training's come back exactly.
        with sharding.ema_weights(generator, self.ema):
            # The conditions as training makes them, the student under the run's mixed precision.
            conds = [self.teacher.encode_condition(labels[i:i + batch] if labels is not None else None)
                     for i in range(0, n, batch)]
            with self.acc.autocast():
                x = torch.cat([student_sample(generator, self.schedule, z[i:i + batch], c,
                                              self.recipe.student.timesteps, g).float().cpu()
                               for i, c in zip(range(0, n, batch), conds)])
        if self.acc.is_main_process:
            self.teacher.save_preview(x, None, labels, self.run_dir / "previews" / f"{name}.png",
                                      title=f"{self.recipe.train.method} student, {name}")


def refuse_sharding(acc) -> None:
    """accelerate's own FSDP or DeepSpeed wrappers would write one process's shard as a
    checkpoint: only plain and data-parallel launches pass; sharding is train.sharding's
    (FSDP2 applied here, inside the processes `accelerate launch --multi_gpu` starts)."""
    from accelerate.utils import DistributedType

    kind = DistributedType(acc.distributed_type)
    if kind != DistributedType.NO and not kind.value.startswith("MULTI_"):
        raise UserError(f"distill does not take accelerate's {kind.value} launch; launch with "
                        f"`accelerate launch --multi_gpu` and set train.sharding = 'fsdp2' to shard the "
                        f"generator and critic (FSDP2)")


def _tracker(name: str):
    """accelerate's tracker for run.log_with, checked before the run starts."""
    if name == "none":
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]():
        raise UserError(f"run.log_with = {name!r} but {name} is not installed; pip install {name}, "
                        f"or set run.log_with = 'none' (metrics.jsonl is written either way)")
    return name
