"""The training loop's mechanics: the two time-scale rule, who receives gradients, the GAN
head, backward simulation for few-step students, bf16 autocast on CPU."""

import pytest
import torch

from dmdcli.recipe import load_recipe
from dmdcli.trainer import DMDTrainer
from tiny_models import save_tiny_unet2d, unet2d_recipe


def trainer_for(tiny_recipe, *overrides, extra=""):
    return DMDTrainer(load_recipe(tiny_recipe(extra=extra), list(overrides)))


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def moved(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_generator_moves_only_on_its_turns_and_critic_every_step(tiny_recipe):
    tr = trainer_for(tiny_recipe, "train.critic_steps_per_generator_step=3", "train.critic_warmup_steps=2",
                     "train.warmup_steps=0")   # (a warm-up starts at learning rate 0)
    turns = []
    for _ in range(11):
        g, c = snapshot(tr.generator), snapshot(tr.critic)
        turn = tr.is_generator_turn()
        tr.train_step()
        assert moved(g, tr.generator) == turn
        assert moved(c, tr.critic)
        turns.append(turn)
    # warm-up 2 iterations, then every third: 2, 5, 8
    assert [i for i, t in enumerate(turns) if t] == [2, 5, 8]


def test_grad_clip_zero_turns_clipping_off(tiny_recipe):
    """train.grad_clip = 0 updates both networks as an unreachable clip does; it used to clip
    every gradient to norm 0, leaving the networks only AdamW's weight decay."""
    common = ("train.critic_steps_per_generator_step=1", "train.critic_warmup_steps=0", "train.warmup_steps=0")
    off, high = trainer_for(tiny_recipe, "train.grad_clip=0", *common), trainer_for(tiny_recipe, "train.grad_clip=1e9", *common)
    for _ in range(3):
        off.train_step()
        high.train_step()
    for a, b in ((off.generator, high.generator), (off.critic, high.critic)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_learning_rates_decay_to_zero_together_over_the_last_iterations(tiny_recipe):
    """Both schedules end at the run's last iteration although the generator's counts from its
    first turn (iteration 4): at iteration 35 both rates are half, at 40 zero."""
    tr = trainer_for(tiny_recipe, "train.lr_decay_steps=10")   # steps 40, warm-up 5, critic warm-up 4
    lrs = {}
    for _ in range(40):
        tr.train_step()
        lrs[tr.step] = (tr.sched_g.get_last_lr()[0], tr.sched_c.get_last_lr()[0])
    assert lrs[30] == (1e-3, 1e-3)
    assert lrs[35] == pytest.approx((5e-4, 5e-4))
    assert lrs[40] == (0.0, 0.0)


def test_gan_losses_train_the_generator_and_the_head_each_on_its_turn(tiny_recipe):
    """The generator's GAN term moves the generator (DM weight 0: it alone) and leaves no
    gradient on the critic; the critic's GAN term trains the head."""
    tr = trainer_for(tiny_recipe, "gan.generator_weight=0.003", "gan.critic_weight=0.01", "train.critic_warmup_steps=0",
                     "train.dm_weight=0", "train.warmup_steps=0")
    critic = tr.acc.unwrap_model(tr.critic)
    head, gen = critic.head, tr.acc.unwrap_model(tr.generator)
    seen_head, seen_gen = [], []
    for p in head.parameters():
        p.register_hook(lambda g: seen_head.append(float(g.abs().sum())))
    for p in gen.parameters():
        p.register_hook(lambda g: seen_gen.append(float(g.abs().sum())))
    logs = tr.generator_step()
    assert "loss_gan_g" in logs and seen_gen and max(seen_gen) > 0
    assert not seen_head and all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())   # unfrozen after the pass
    logs = tr.critic_step()
    assert "loss_gan_c" in logs and seen_head and max(seen_head) > 0
    assert all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())


def test_gan_passes_stop_at_the_critics_bottleneck(tiny_recipe):
    """Past the bottleneck only the critic's denoising needs the network: the generator's GAN
    pass and the real images stop there (DMD2's authors do the same)."""
    tr = trainer_for(tiny_recipe, "gan.generator_weight=0.003", "gan.critic_weight=0.01", "train.critic_warmup_steps=0")
    critic = tr.acc.unwrap_model(tr.critic)
    after_bottleneck = critic.critic.body[-1]
    seen = []
    after_bottleneck.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    n = tr.recipe.train.batch_size
    tr.generator_step()
    assert seen == [n]   # the DM loss's fake score; the GAN pass stopped at the bottleneck
    seen.clear()
    logs = tr.critic_step()
    assert seen == [n]   # the fakes' denoising; the reals stopped at the bottleneck
    assert logs["loss_gan_c"] > 0


def test_learning_rate_warmup_counts_iterations(tiny_recipe):
    """train.warmup_steps is in iterations for both networks, whatever the TTUR ratio."""
    tr = trainer_for(tiny_recipe, "train.critic_steps_per_generator_step=5", "train.critic_warmup_steps=0",
                     "train.warmup_steps=10")
    lrs = []
    for _ in range(11):
        lrs.append((tr.opt_g.param_groups[0]["lr"], tr.opt_c.param_groups[0]["lr"]))
        tr.train_step()
    assert [g for g, _ in lrs] == [c for _, c in lrs]
    assert lrs[5][0] == pytest.approx(5e-4) and lrs[10][0] == pytest.approx(1e-3)


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory):
    return save_tiny_unet2d(tmp_path_factory.mktemp("u") / "t", num_classes=3)


def unet_recipe(tmp_path, folder, extra=""):
    return unet2d_recipe(tmp_path / "u.toml", folder, tmp_path / "run", steps=4, ratio=2, extra=extra)


def test_the_teachers_trainable_copy_is_freed_once_both_networks_exist(tmp_path, unet_teacher):
    """The fp32 weights kept to make generator and critic (3.4 GB for SD1.5 on every rank's
    CPU) do not stay for the run."""
    tr = DMDTrainer(load_recipe(unet_recipe(tmp_path, unet_teacher)))
    with pytest.raises(RuntimeError, match="trainable weights were released"):
        tr.teacher.make_generator()


def test_real_score_never_receives_gradients(tmp_path, unet_teacher):
    tr = DMDTrainer(load_recipe(unet_recipe(tmp_path, unet_teacher), ["student.timesteps=[999, 749, 499, 249]"]))
    before = snapshot(tr.teacher.real)
    for _ in range(4):
        logs = tr.train_step()
        assert all(torch.isfinite(torch.tensor(float(v))) for v in logs.values())
    assert all(p.grad is None and not p.requires_grad for p in tr.teacher.real.parameters())
    assert not moved(before, tr.teacher.real)


def test_backward_simulation_uses_every_step_index(tmp_path, unet_teacher, monkeypatch):
    tr = DMDTrainer(load_recipe(unet_recipe(tmp_path, unet_teacher), ["student.timesteps=[999, 749, 499, 249]"]))
    used = []
    real = tr._backward_simulate

    def spy(z, cond):
        x, t = real(z, cond)
        used.append(int(t[0]))
        assert (t == t[0]).all()
        return x, t

    monkeypatch.setattr(tr, "_backward_simulate", spy)
    for _ in range(12):
        tr.train_step()
    assert set(used) == {999, 749, 499, 249}


def test_bf16_autocast_runs_on_cpu(tiny_recipe, tmp_path):
    """The same code path under bf16 autocast (its own process: accelerate's state is per process)."""
    from conftest import run_dmd

    result = run_dmd("distill", tiny_recipe(steps=6, checkpoint_every=6), "--set", "train.mixed_precision='bf16'")
    assert result.returncode == 0, result.stderr
    import json

    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss_critic"])) for r in rows)


def test_gan_with_real_fashion_images_needs_matching_channels(tmp_path, unet_teacher):
    from dmdcli.datasets import DEBIAN_FASHION_MNIST
    from dmdcli.utils.errors import UserError

    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    recipe = load_recipe(unet_recipe(tmp_path, unet_teacher), ["gan.generator_weight=0.003", "gan.critic_weight=0.01",
                                                              "gan.dataset='fashion-mnist'"])
    with pytest.raises(UserError, match="has 10 classes; the teacher knows 3"):
        DMDTrainer(recipe)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_or_is_skipped(tiny_recipe, tmp_path, monkeypatch, capsys, policy):
    import json

    from dmdcli import losses
    from dmdcli.cli import main

    real = losses.critic_loss_vp
    calls = {"n": 0}

    def sometimes_nan(eps_pred, eps):   # (NaN in x0 predictions is scrubbed by the DM loss itself)
        calls["n"] += 1
        out = real(eps_pred, eps)
        return out * float("nan") if calls["n"] in (16, 17) else out

    monkeypatch.setattr(losses, "critic_loss_vp", sometimes_nan)
    path = tiny_recipe(steps=30, checkpoint_every=10)
    code = main(["distill", str(path), "--set", f"train.on_non_finite='{policy}'", "--set", "train.critic_warmup_steps=0"])
    run = tmp_path / "runs" / "tiny"
    if policy == "stop":
        assert code == 2
        err = capsys.readouterr().err
        assert "the critic loss became nan at step 15" in err and "the last good checkpoint is kept" in err
        assert (run / "checkpoints" / "step-00000010").is_dir()
    else:
        assert code == 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("skipped_critic", 0) for r in rows) == 2
        from safetensors.torch import load_file

        weights = load_file(str(run / "checkpoints" / "step-00000030" / "generator.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values())
        from dmdcli.utils import checkpoint

        state = checkpoint.load_tree(run / "checkpoints" / "step-00000030", "state")
        assert state["sched_c"]["last_epoch"] == 30   # skipped updates still count as iterations


def test_tensorboard_logs_what_metrics_jsonl_holds(tiny_recipe, tmp_path):
    """run.log_with = "tensorboard" (the default): the same windowed means as metrics.jsonl."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmdcli.cli import main

    assert main(["distill", str(tiny_recipe(steps=20, checkpoint_every=20))]) == 0
    run = tmp_path / "runs" / "tiny"
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    critic = [(e.step, e.value) for e in events.Scalars("loss_critic")]
    assert critic == [(log["step"], pytest.approx(log["loss_critic"], rel=1e-6)) for log in logs]
    assert [e.step for e in events.Scalars("loss_dm")] == [log["step"] for log in logs if "loss_dm" in log]


def test_missing_tracker_is_one_line(tiny_recipe, capsys):
    from accelerate.utils import is_wandb_available

    from dmdcli.cli import main

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    assert main(["distill", str(tiny_recipe()), "--set", "run.log_with=wandb"]) == 2
    assert ("run.log_with = 'wandb' but wandb is not installed; pip install wandb, or set "
            "run.log_with = 'none'") in capsys.readouterr().err


def test_generator_ema_follows_generator_steps_only(tiny_recipe):
    """train.ema_decay: after each generator step e <- d e + (1 - d) w with d the recipe's
    decay (not diffusers' warm-up min(decay, (1 + n) / (10 + n))); critic steps leave it alone."""
    r = load_recipe(tiny_recipe(extra="ema_decay = 0.9\n"))
    trainer = DMDTrainer(r)
    gen = trainer.acc.unwrap_model(trainer.generator)
    expected = [p.detach().clone() for p in gen.parameters()]
    n = 0
    for _ in range(16):
        turn = trainer.is_generator_turn()
        trainer.train_step()
        if turn:
            n += 1
            d = 0.0 if n <= 1 else 0.9   # EMAModel's first step copies the weights
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, gen.parameters())]
    assert n >= 4
    for e, s in zip(expected, trainer.ema.shadow_params):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
    ema = trainer.ema_state_dict()
    raw = gen.state_dict()
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)
    # Previews draw with the EMA weights and give the raw ones back bitwise.
    trainer.recipe.run.preview_samples = 16
    trainer.preview("check")
    assert (trainer.run_dir / "previews" / "check.png").is_file()
    assert all(torch.equal(raw[k], v) for k, v in gen.state_dict().items())


def test_tracker_config_flattens_nested_tables(tiny_recipe):
    from dmdcli.runner import _flat

    flat = _flat(load_recipe(tiny_recipe()))
    assert flat["teacher.gmm.hidden"] == 32 and flat["train.method"] == "dmd2"
    assert flat["train.betas"] == "[0.9, 0.999]" and all(not isinstance(v, (dict, list)) for v in flat.values())


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tmp_path, unet_teacher):
    """train.gradient_checkpointing: blocks run again in the backward pass; same weights after."""
    results = []
    for flag in ("false", "true"):
        recipe = unet2d_recipe(tmp_path / f"{flag}.toml", unet_teacher, tmp_path / flag,
                               extra=f"gradient_checkpointing = {flag}\n")
        trainer = DMDTrainer(load_recipe(recipe))
        gen = trainer.acc.unwrap_model(trainer.generator)
        assert gen.unet.is_gradient_checkpointing == (flag == "true")
        assert trainer.acc.unwrap_model(trainer.critic).unet.is_gradient_checkpointing == (flag == "true")
        calls = []
        gen.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(1))
        trainer.generator_step()
        results.append((len(calls), [p.detach().clone() for p in gen.parameters()]))
    (calls_plain, after_plain), (calls_ckpt, after_ckpt) = results
    assert calls_ckpt > calls_plain
    for a, b in zip(after_plain, after_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_is_refused_for_the_mlp(tiny_recipe, capsys):
    from dmdcli.cli import main

    assert main(["distill", str(tiny_recipe()), "--set", "train.gradient_checkpointing=true"]) == 2
    assert "the gmm teacher's networks have no checkpointing" in capsys.readouterr().err


def test_dry_run_counts_parameters_memory_and_passes(tmp_path, unet_teacher, capsys):
    from dmdcli.cli import main
    from dmdcli.teachers import build_teacher

    recipe = unet2d_recipe(tmp_path / "r.toml", unet_teacher, tmp_path / "run", ratio=3)
    assert main(["distill", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    teacher = build_teacher(load_recipe(recipe).teacher)
    n = sum(p.numel() for p in teacher.make_generator().parameters())
    assert f"# parameters: generator {n:,}, critic {n:,}, real score {n:,} (frozen)" in out
    mib = 2 * 4 * n / 2 ** 20   # two trainable fp32 copies (tests/test_memory.py checks every figure)
    assert f"# memory per process: weights {mib:.1f} MiB, gradients {mib:.1f} MiB, AdamW state" in out
    assert "MiB: fits 40 GB and 80 GB cards" in out
    assert ("# every iteration (critic step): generator forward without gradients at batch 2 (not in generator "
            "turns: their samples serve)") in out
    assert "# every 3 iterations (generator step): generator forward+backward at batch 2" in out
    assert "real score forward at batch 4 (guidance: conditional and unconditional)" in out
    assert not (tmp_path / "run").exists()


def test_dm_loss_reads_the_critic_ema(tiny_recipe):
    """train.critic_ema_decay: after each critic step e <- d e + (1 - d) w; the DM loss's fake
    score comes from e, so a generator step equals that of a twin whose critic holds e."""
    a = trainer_for(tiny_recipe, "train.critic_ema_decay=0.8", "train.critic_warmup_steps=0")
    b = trainer_for(tiny_recipe, "train.critic_warmup_steps=0")
    critic_a, critic_b = a.acc.unwrap_model(a.critic), b.acc.unwrap_model(b.critic)
    expected = snapshot(critic_a)
    for _ in range(2):   # a generator and a critic step, then a critic step
        a.train_step()
        b.train_step()
        expected = [0.8 * e + 0.2 * p.detach() for e, p in zip(expected, critic_a.parameters())]
    for e, s in zip(expected, a.critic_ema.parameters()):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
    assert a.is_generator_turn() and moved(expected, critic_a)   # the EMA lags the raw critic
    assert all(torch.equal(p, q) for p, q in zip(critic_a.parameters(), critic_b.parameters()))
    critic_b.load_state_dict(a.critic_ema.state_dict())
    a.generator_step()
    b.generator_step()
    assert all(torch.equal(p, q) for p, q in zip(a.generator.parameters(), b.generator.parameters()))


def test_sample_uses_the_ema_unless_told_not_to(tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    from dmdcli.cli import main
    from dmdcli.runs import load_student

    assert main(["distill", str(tiny_recipe(steps=20, checkpoint_every=20, extra="ema_decay = 0.9\n"))]) == 0
    run = tmp_path / "runs" / "tiny"
    ema = load_file(str(run / "checkpoints" / "step-00000020" / "generator_ema.safetensors"))
    gen = load_student(run, device="cpu")[2].state_dict()
    assert all(torch.equal(gen[k], ema[k]) for k in ema)
    raw = load_student(run, device="cpu", ema=False)[2].state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)
    for flag, out in (("--ema", "a"), ("--no-ema", "b")):
        assert main(["sample", str(run), "--num", "64", "--teacher-steps", "0", "--out", str(tmp_path / out), flag]) == 0
    a, b = (load_file(str(tmp_path / o / "samples.safetensors"))["x"] for o in "ab")
    assert not torch.equal(a, b)


def test_lora_trains_adapters_only_and_exports_merged(tmp_path, unet_teacher):
    """train.lora_rank: the UNets' own weights stay frozen, the adapters move; sampling loads
    them; export merges them into a plain UNet2DModel that computes the same."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from dmdcli.cli import main
    from dmdcli.runs import load_student

    recipe = unet2d_recipe(tmp_path / "r.toml", unet_teacher, tmp_path / "run", steps=2,
                           extra="lora_rank = 4\nlr_generator = 1e-2\nlr_critic = 1e-2\n")
    trainer = DMDTrainer(load_recipe(recipe))
    gen = trainer.acc.unwrap_model(trainer.generator)
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    critic = trainer.acc.unwrap_model(trainer.critic)
    assert all("lora_" in n for n, p in critic.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    trainer.train_step()
    moved = {n for n, p in gen.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= trainable
    assert main(["distill", str(recipe)]) == 0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "generator.safetensors"))
    assert any("lora_A" in k for k in weights)
    _, _, student, _ = load_student(tmp_path / "run", device="cpu")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    plain = UNet2DModel.from_pretrained(tmp_path / "export" / "unet")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([999, 999]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, class_labels=c).sample, student(x, t, c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"])
def test_sharded_launches_are_refused_before_any_work(kind, tiny_recipe, monkeypatch):
    """Checkpoints are whole state dicts from the main process: under FSDP, DeepSpeed or any
    other sharding they would hold one shard. accelerate will not start those on a CPU, so the
    trainer is handed the one attribute it reads first; no teacher may be loaded."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import dmdcli.trainer
    from dmdcli.utils.errors import UserError
    from dmdcli.trainer import refuse_sharding

    monkeypatch.setattr(dmdcli.trainer, "build_teacher", lambda cfg: pytest.fail("a teacher was loaded"))
    with pytest.raises(UserError, match=f"distill does not take accelerate.s {kind} launch; launch with .accelerate launch --multi_gpu. and set train.sharding = .fsdp2."):
        DMDTrainer(load_recipe(tiny_recipe()), accelerator=SimpleNamespace(distributed_type=DistributedType[kind]))
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        refuse_sharding(SimpleNamespace(distributed_type=DistributedType[fine]))


def test_a_log_file_gets_plain_progress_lines_with_the_losses(tiny_recipe, tmp_path, capsys, monkeypatch):
    """Where output goes to a file (a batch job, nohup), rich draws no live bar: the shared
    bar prints plain lines (here every step: PLAIN_EVERY = 0) with the losses of the last
    log window, and a resumed run's lines go on from its checkpoint."""
    import re

    from rich.console import Console

    import dmdcli.cli
    import dmdcli.utils.progress
    from dmdcli.cli import main

    monkeypatch.setattr(dmdcli.cli, "console", Console(stderr=True, force_terminal=False, force_interactive=False))
    monkeypatch.setattr(dmdcli.utils.progress, "PLAIN_EVERY", 0.0)
    recipe = tiny_recipe(steps=20, checkpoint_every=10)
    assert main(["distill", str(recipe), "--set", "run.log_every=5", "--set", "run.log_with=none",
                 "--set", "train.steps=10"]) == 0
    assert main(["distill", str(recipe), "--set", "run.log_every=5", "--set", "run.log_with=none"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("distill ")]
    assert [ln.split()[1] for ln in lines] == [f"{i}/10" for i in range(1, 11)] + [f"{i}/20" for i in range(11, 21)]
    pattern = r"distill \d+/\d+  \d+\.\d\d/s  eta \d\d:\d\d:\d\d  critic \d+\.\d{4}  dm \d+\.\d{4}"
    with_losses = lines[4:10] + lines[14:]   # from each run's first log window (steps 5 and 15) on
    assert all(re.fullmatch(pattern, ln) for ln in with_losses), lines
    assert not any("critic" in ln for ln in lines[:4] + lines[10:14])


def test_real_score_guidance_applies_only_inside_its_interval(tiny_recipe):
    """DM timesteps are 20..980: an interval of [990, 999] guides none of them, so the
    generator's first update equals the unguided one, and differs from the guided one."""
    def first_update(*overrides):
        tr = trainer_for(tiny_recipe, "teacher.gmm.conditional=true", "train.critic_warmup_steps=0",
                         "train.warmup_steps=0", *overrides)
        tr.generator_step()
        return torch.cat([p.detach().flatten() for p in tr.generator.parameters()])
    unguided = first_update("teacher.guidance=1.0")
    outside = first_update("teacher.guidance=3.0", "teacher.guidance_interval=[990, 999]")
    guided = first_update("teacher.guidance=3.0")
    assert torch.equal(outside, unguided)
    assert not torch.allclose(guided, unguided)
    assert torch.equal(first_update("teacher.guidance=3.0", "teacher.guidance_interval=[0, 999]"), guided)
    # train.dm_timesteps moves the DM loss's timesteps into that interval: guided again.
    inside = first_update("teacher.guidance=3.0", "teacher.guidance_interval=[990, 999]", "train.dm_timesteps=[990, 999]")
    assert not torch.allclose(inside, unguided)


def test_critic_of_a_v_prediction_teacher_is_trained_on_v(tmp_path, monkeypatch):
    """The critic learns with its teacher's own loss: v-MSE for a v-prediction teacher (epsilon
    MSE through to_eps would weight v's error by alpha_bar, nearly 0 at high noise)."""
    from dmdcli import losses

    folder = save_tiny_unet2d(tmp_path / "v", num_classes=3, prediction_type="v_prediction")
    tr = DMDTrainer(load_recipe(unet_recipe(tmp_path, folder)))
    seen = {}
    fake, loss = tr._fake_samples, losses.critic_loss_vp
    monkeypatch.setattr(tr, "_fake_samples", lambda n, grad: seen.setdefault("x", fake(n, grad)))
    monkeypatch.setattr(losses, "critic_loss_vp", lambda pred, target: seen.update(pred=pred, target=target)
                        or loss(pred, target))
    unet = tr.acc.unwrap_model(tr.critic).unet
    unet.register_forward_hook(lambda m, args, out: seen.update(x_t=args[0], t=args[1], raw=out.sample))
    tr.critic_step()
    x, x_t, t = seen["x"][0], seen["x_t"], seen["t"]
    s, n = tr.schedule.coefficients(t, x)
    eps = (x_t.double() - s * x.double()) / n
    torch.testing.assert_close(seen["target"].double(), s * eps - n * x.double(), rtol=1e-4, atol=1e-5)
    assert torch.equal(seen["pred"], seen["raw"])   # the network's own output, not converted


def test_init_from_starts_a_new_run_from_another_runs_checkpoint(tiny_recipe, tmp_path, capsys):
    """Stage two from stage one: the generator (its EMA) and the matching critic tensors are
    read once; the GAN head is new; a rerun resumes its own checkpoint instead."""
    from safetensors.torch import load_file

    from dmdcli.cli import main
    from dmdcli.runs import init_from

    first = tiny_recipe("first", steps=4, checkpoint_every=4, extra="ema_decay = 0.9\n")
    assert main(["distill", str(first)]) == 0
    ckpt = tmp_path / "runs" / "first" / "checkpoints" / "step-00000004"
    second = tiny_recipe("second", steps=2, checkpoint_every=2,
                         extra=f'init_from = "{tmp_path / "runs" / "first"}"\nema_decay = 0.9\n[gan]\ngenerator_weight = 0.003\n'
                               f'critic_weight = 0.01\n')
    tr = DMDTrainer(load_recipe(second))
    said = init_from(tr, tmp_path / "runs" / "first")
    gen, critic = tr.acc.unwrap_model(tr.generator).state_dict(), tr.acc.unwrap_model(tr.critic).state_dict()
    ema = load_file(str(ckpt / "generator_ema.safetensors"))
    assert all(torch.equal(gen[k], ema[k]) for k in ema)
    old_critic = load_file(str(ckpt / "critic.safetensors"))
    assert all(torch.equal(critic[f"critic.{k}"], v) for k, v in old_critic.items())
    head = [k for k in critic if k.startswith("head.")]
    assert head and f"critic {len(old_critic)} of {len(critic)} tensors" in said
    assert all(torch.equal(s, p) for s, p in zip(tr.ema.shadow_params, tr.acc.unwrap_model(tr.generator).parameters()))
    capsys.readouterr()
    assert main(["distill", str(second)]) == 0
    assert f"initialised from {ckpt}" in capsys.readouterr().err   # the console is stderr
    assert main(["distill", str(second), "--set", "train.steps=3"]) == 0
    out = capsys.readouterr().err
    assert "initialised" not in out and "resuming" in out


def test_init_from_without_a_checkpoint_is_one_line(tiny_recipe, tmp_path, capsys):
    from dmdcli.cli import main

    (tmp_path / "empty").mkdir()
    r = tiny_recipe("x", steps=2, extra=f'init_from = "{tmp_path / "empty"}"\n')
    assert main(["distill", str(r)]) == 2
    err = capsys.readouterr().err
    assert f"train.init_from = '{tmp_path / 'empty'}' holds no checkpoint" in err and "Traceback" not in err


def test_gpu_settings_without_a_gpu(tiny_recipe, monkeypatch, capsys):
    """What a CUDA run gets, checked on the CPU: TF32 and cuDNN's autotuner, fused AdamW,
    bf16 only on cards that have it (auto: fp16 for the frozen teacher; training refused)."""
    from dmdcli.cli import main
    from dmdcli.teachers import resolve_dtype
    from dmdcli.trainer import adamw, cuda_speed_settings, make_accelerator

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        cuda_speed_settings()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
    r = load_recipe(tiny_recipe())
    acc = make_accelerator(r)   # DDP's settings, used under accelerate launch
    assert acc.ddp_handler.gradient_as_bucket_view and not acc.ddp_handler.find_unused_parameters
    assert acc.init_handler.timeout.total_seconds() >= 3600   # rank 0 writing a large checkpoint
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw(p, 1e-3, r, torch.device("cuda")).defaults["fused"] is True
    assert not adamw(p, 1e-3, r, torch.device("cpu")).defaults["fused"]
    assert resolve_dtype("auto") == torch.float32   # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") == torch.float16
    assert main(["distill", str(tiny_recipe()), "--set", "train.mixed_precision='bf16'"]) == 2
    assert "train.mixed_precision = 'bf16' but this GPU has no bf16" in capsys.readouterr().err


def test_dm_and_critic_terms_get_the_right_predictions(tiny_recipe, monkeypatch):
    """The DM loss gets the generator's sample, the teacher's x0 and the critic's x0 at the
    same x_t, in that order (swapping real and fake reverses the gradient); the critic's loss
    gets its own prediction of the noise added to a stopgrad generator sample."""
    from dmdcli import losses

    tr = trainer_for(tiny_recipe, "train.critic_warmup_steps=0", "teacher.gmm.conditional=true",
                     "teacher.guidance=1.5")
    seen, noised = {}, []
    dm, add_noise = losses.distribution_matching_loss, tr.schedule.add_noise
    monkeypatch.setattr(losses, "distribution_matching_loss", lambda x, r, f: seen.update(x=x, r=r, f=f) or dm(x, r, f))

    def spy(x0, eps, t):
        out = add_noise(x0, eps, t)
        noised.append((x0, eps, t, out))
        return out
    monkeypatch.setattr(tr.schedule, "add_noise", spy)
    labels = []
    encode = tr.teacher.encode_condition
    monkeypatch.setattr(tr.teacher, "encode_condition", lambda y: labels.append(y) or encode(y))
    tr.generator_step()
    x0, _, t, x_t = noised[0]
    cond = labels[0]
    torch.testing.assert_close(seen["x"].detach(), x0)
    with torch.no_grad():
        torch.testing.assert_close(seen["r"], tr.teacher.denoise(x_t, t, cond, 1.5))
        critic = tr.acc.unwrap_model(tr.critic)
        torch.testing.assert_close(seen["f"], tr.schedule.to_x0(critic(x_t, t, cond), x_t, t, critic.prediction_type))
    assert not torch.allclose(seen["r"], seen["f"])
    got = {}
    vp = losses.critic_loss_vp
    monkeypatch.setattr(losses, "critic_loss_vp", lambda p, target: got.update(p=p, target=target) or vp(p, target))
    noised.clear()
    tr.critic_step()
    x, eps, t, x_t = noised[0]
    assert not x.requires_grad
    torch.testing.assert_close(got["target"], tr.schedule.training_target(x, eps, t, critic.prediction_type))


def test_the_critic_reuses_the_generator_turns_samples(tiny_recipe, monkeypatch):
    """One generator forward an iteration (issue 26, item 5): in a generator turn the critic
    trains on the samples the generator just made (as the authors' loop does), not on a second
    forward of the updated generator; in the critic's own turns it draws fresh ones."""
    tr = trainer_for(tiny_recipe, "train.critic_warmup_steps=1")
    gen = tr.acc.unwrap_model(tr.generator)
    outputs = []
    gen.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    critic_inputs = []
    add_noise = tr.schedule.add_noise
    monkeypatch.setattr(tr.schedule, "add_noise", lambda x0, eps, t: critic_inputs.append(x0) or add_noise(x0, eps, t))
    for _ in range(5):
        turn = tr.is_generator_turn()
        outputs.clear()
        critic_inputs.clear()
        tr.train_step()
        assert len(outputs) == 1, (turn, len(outputs))
        torch.testing.assert_close(critic_inputs[-1], outputs[0])   # the critic's fakes, noised last
