"""The EDM teacher family: preconditioning, EDM's Heun sampler, safe conversion of EDM's
pickles, and distillation on a tiny network of the ImageNet-64 architecture."""

import json
import math
import sys

import pytest
import torch

from conftest import dmd_here, run_dmd
from dmdcli.teachers.edm import ADMUNet, EDMDenoiser, build_network, edm_preconditioning, load_edm_folder
from dmdcli.losses import critic_loss_edm
from dmdcli.sampling import edm_ode, karras_sigmas, student_sample
from dmdcli.schedules import EDMSchedule
from tiny_models import write_edm_pickle


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 2.0, 80.0])
def test_preconditioning_is_edms(sigma):
    """EDM table 1 with sigma_data 0.5, and the critic's weight is EDM's lambda = 1 / c_out^2."""
    s, d = torch.tensor(sigma, dtype=torch.float64), 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(s, d)
    assert c_skip.item() == pytest.approx(d ** 2 / (sigma ** 2 + d ** 2), rel=1e-12)
    assert c_out.item() == pytest.approx(sigma * d / math.sqrt(sigma ** 2 + d ** 2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma ** 2 + d ** 2), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)
    # critic_loss_edm with a unit error at every pixel is its weight.
    w = critic_loss_edm(torch.ones(1, 1), torch.zeros(1, 1), s.reshape(1), d).item()
    assert w == pytest.approx(1 / c_out.item() ** 2, rel=1e-5)


def _gaussian_ode_error(steps: int, heun: bool) -> float:
    """Max relative error of the sampler on data N(0, 0.5^2), whose denoiser is exact:
    D(x; sigma) = x s^2 / (s^2 + sigma^2), and the ODE solution x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2)."""
    s = 0.5
    sigmas = karras_sigmas(steps, EDMSchedule()).double()
    z = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = edm_ode(lambda x, sg: x * s * s / (s * s + sg * sg), z * sigmas[0], sigmas, heun=heun)
    exact = z * sigmas[0] * s / math.sqrt(s * s + float(sigmas[0]) ** 2)
    return float((x - exact).abs().max() / exact.abs().max())


def test_heun_matches_the_analytic_ode_solution_and_is_second_order():
    assert _gaussian_ode_error(256, heun=True) < 5e-4        # the paper's pair setting: 256 steps
    heun_ratio = _gaussian_ode_error(64, True) / _gaussian_ode_error(128, True)
    euler_ratio = _gaussian_ode_error(64, False) / _gaussian_ode_error(128, False)
    assert 3.0 < heun_ratio < 5.5      # halving the step divides the error by about 4
    assert 1.6 < euler_ratio < 2.4     # Euler by about 2


def test_karras_sigmas_are_edms():
    sigmas = karras_sigmas(18, EDMSchedule()).double()
    i = torch.arange(18, dtype=torch.float64)
    rho = 7
    expected = (80 ** (1 / rho) + i / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    torch.testing.assert_close(sigmas[:-1], expected, rtol=1e-5, atol=0)
    assert sigmas[-1] == 0


def test_generator_input_is_noise_times_80_at_sigma_80():
    schedule = EDMSchedule()
    seen = {}

    class Probe(torch.nn.Module):   # records what the generator is fed
        prediction_type = "sample"

        def forward(self, x, t, cond):
            seen["x"], seen["sigma"] = x, schedule.sigma(t)
            return torch.zeros_like(x)

    z = torch.randn(3, 2)
    student_sample(Probe(), schedule, z, None, [999])
    torch.testing.assert_close(seen["x"], z * 80, rtol=1e-6, atol=0)
    assert torch.allclose(seen["sigma"], torch.full((3,), 80.0, dtype=torch.float64))


def _convert(tmp_path, **kwargs):
    """Write a tiny EDM-format pickle and convert it with the CLI: (network, marker, result)."""
    marker = tmp_path / "code-ran"
    net = write_edm_pickle(tmp_path / "edm.pkl", marker, **kwargs)
    result = run_dmd("convert-teacher", tmp_path / "edm.pkl", "--out", tmp_path / "teacher")
    return net, marker, result


@pytest.mark.parametrize("protocol", [2, 4])   # Python 2 names and _codecs bytes; the default protocol
def test_convert_reproduces_the_network_exactly_without_running_its_code(tmp_path, protocol):
    net, marker, result = _convert(tmp_path, protocol=protocol)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "the module source stored in the pickle was executed"
    config, state = load_edm_folder(tmp_path / "teacher")
    assert config["label_dim"] == 10 and config["model"]["channel_mult"] == [1, 2]
    assert config["source"]["file"] == "edm.pkl" and len(config["source"]["sha256"]) == 64
    ours = build_network(config, state).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, generator=torch.Generator().manual_seed(2))
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 7, 9]), 10).float()
    with torch.no_grad():
        assert torch.equal(ours(x, noise, labels), net(x, noise, labels))
    d_ours = EDMDenoiser(ours, 10, EDMSchedule().sigmas)
    d_ref = EDMDenoiser(net, 10, EDMSchedule().sigmas)
    t = torch.tensor([0, 250, 600, 999])
    with torch.no_grad():
        assert torch.equal(d_ours(x, t, labels.argmax(1)), d_ref(x, t, labels.argmax(1)))


def test_convert_imports_nothing_from_the_pickle(tmp_path):
    marker = tmp_path / "code-ran"
    write_edm_pickle(tmp_path / "edm.pkl", marker, label_dim=0)
    code = (f"import sys; from dmdcli.teachers.convert_edm import convert_edm; "
            f"convert_edm({str(tmp_path / 'edm.pkl')!r}, {str(tmp_path / 'out')!r}); "
            f"print(sorted(m for m in sys.modules if m.startswith(('torch_utils', 'dnnlib', '_imported_module'))))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not marker.exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["label_dim"] == 0


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_without_the_flag(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": _RunsCode(marker)}))
    result = run_dmd("convert-teacher", tmp_path / "evil.pkl", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "posix.system" in result.stderr and "--trust-pickle" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The flag does what it says: the file's code runs (then it is not an EDM network).
    result = run_dmd("convert-teacher", tmp_path / "evil.pkl", "--out", tmp_path / "out", "--trust-pickle")
    assert marker.exists()
    assert result.returncode == 2 and "not EDMPrecond" in result.stderr


def test_truncated_pickle_is_named(tmp_path):
    write_edm_pickle(tmp_path / "edm.pkl", tmp_path / "m")
    data = (tmp_path / "edm.pkl").read_bytes()
    (tmp_path / "edm.pkl").write_bytes(data[: len(data) // 2])
    result = run_dmd("convert-teacher", tmp_path / "edm.pkl", "--out", tmp_path / "teacher")
    assert result.returncode == 2
    assert "edm.pkl is not a readable pickle" in result.stderr
    assert not (tmp_path / "teacher").exists()


def test_distill_and_sample_with_a_tiny_edm_teacher(tmp_path, monkeypatch):
    """DMD2 with the GAN head on ADM's bottleneck, DMD v1 on Heun pairs, then sample and
    `fid --ref imagenet64` (with a reference file of the test's own features in the cache)."""
    from PIL import Image

    _, _, result = _convert(tmp_path)
    assert result.returncode == 0, result.stderr
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    recipe = tmp_path / "edm.toml"
    recipe.write_text(f"""
[run]
out = "{tmp_path / 'run'}"
checkpoint_every = 2
preview_samples = 0
[teacher]
name = "edm"
edm.model = "{tmp_path / 'teacher'}"
[train]
steps = 3
batch_size = 2
critic_steps_per_generator_step = 2
warmup_steps = 0
lr_generator = 1e-4
lr_critic = 1e-4
[gan]
generator_weight = 3e-3
critic_weight = 1e-2
dataset = "imagefolder:{tmp_path / 'images'}"
""")
    result = dmd_here("distill", recipe)
    assert result.returncode == 0, result.stderr
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 3 and all(math.isfinite(v) for log in logs for v in log.values())
    assert "loss_gan_c" in logs[-1]
    result = dmd_here("make-pairs", "--teacher", "edm", "--set", f"teacher.edm.model={tmp_path / 'teacher'}",
                     "--num", 4, "--steps", 3, "--out", tmp_path / "pairs")
    assert result.returncode == 0, result.stderr
    assert "heun 3 steps" in result.stderr
    result = dmd_here("distill", recipe, "--set", f"run.out='{tmp_path / 'run-v1'}'", "--set", "train.method='dmd'",
                     "--set", f"regression.pairs='{tmp_path / 'pairs'}'", "--set", "gan.generator_weight=0",
                     "--set", "gan.critic_weight=0", "--set", "train.steps=2")
    assert result.returncode == 0, result.stderr
    assert "loss_reg" in (tmp_path / "run-v1" / "metrics.jsonl").read_text()
    result = dmd_here("sample", tmp_path / "run", "--num", 20, "--teacher-steps", 2, "--out", tmp_path / "samples",
                     "--images", "png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "samples" / "samples.safetensors").is_file() and (tmp_path / "samples" / "samples.png").is_file()
    pngs = sorted((tmp_path / "samples" / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(20)]
    assert len(list((tmp_path / "samples" / "teacher-images").iterdir())) == 20
    result = dmd_here("sample", tmp_path / "run", "--num", 5, "--teacher-steps", 0, "--out", tmp_path / "npz",
                     "--images", "npz")
    assert result.returncode == 0, result.stderr
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    with np.load(tmp_path / "npz" / "samples.npz") as f:
        arr, labels = f["arr_0"], f["label"]
    x = load_file(str(tmp_path / "npz" / "samples.safetensors"))["x"]
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 3) and (arr == expected).all()
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert (np.asarray(Image.open(pngs[0])) == load_png_expected(tmp_path)).all()
    # export: a dmd-edm/1 folder, said in one line; its card's snippet gives the student's images.
    result = dmd_here("export", tmp_path / "run", "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    assert "note: the edm student is EDM's ADM network, which diffusers has no class for" in result.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    scope = {}
    exec(snippet, scope)
    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    _, teacher, generator, _ = load_student(tmp_path / "run", device="cpu")
    with torch.no_grad():
        expected = student_sample(generator, teacher.schedule, scope["z"], torch.arange(16) % teacher.num_classes,
                                  [999])
    torch.testing.assert_close(scope["x"], expected)
    # sample reads an exported folder as it reads the run: the same images (float16 weights: close).
    result = dmd_here("export", tmp_path / "run", "--out", tmp_path / "export16", "--float16")
    assert result.returncode == 0, result.stderr
    sizes = [(tmp_path / f / "model.safetensors").stat().st_size for f in ("export", "export16")]
    assert sizes[1] < 0.55 * sizes[0]
    for folder, tol in (("export", 0.0), ("export16", 2e-2)):
        result = dmd_here("sample", tmp_path / folder, "--num", 5, "--teacher-steps", 0, "--out",
                         tmp_path / f"{folder}-samples")
        assert result.returncode == 0, result.stderr
        got = load_file(str(tmp_path / f"{folder}-samples" / "samples.safetensors"))["x"]
        torch.testing.assert_close(got, x, atol=tol, rtol=0)
        assert tol == 0 or not torch.equal(got, x)   # the float16 folder really holds rounded weights
    features = tmp_path / "features.pt"
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                         torch.nn.Linear(12, 4))).save(str(features))
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    result = dmd_here("fid-ref", tmp_path / "samples" / "teacher.safetensors", "--out",
                     tmp_path / "cache" / "refs" / "imagenet-64x64.npz", "--features", features,
                     "--mode", "legacy_tensorflow")
    assert result.returncode == 0, result.stderr
    result = dmd_here("fid", tmp_path / "samples", "--ref", "imagenet64", "--features", features,
                     "--json", tmp_path / "fid.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "fid.json").read_text())
    assert report["mode"] == "legacy_tensorflow" and math.isfinite(report["fid"]) and report["fid"] > 0


def load_png_expected(tmp_path):
    """Image 0 of the 20-sample run, as the PNG should hold it."""
    from safetensors.torch import load_file

    x = load_file(str(tmp_path / "samples" / "samples.safetensors"))["x"][0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_guidance_is_refused_for_edm_teachers(tmp_path):
    _, _, result = _convert(tmp_path)
    result = run_dmd("sample", "--teacher", "edm", "--set", f"teacher.edm.model={tmp_path / 'teacher'}",
                     "--num", 2, "--guidance", 2, "--out", tmp_path / "s")
    assert result.returncode == 2
    assert "guidance 2.0 needs an unconditional model" in result.stderr


def test_full_size_network_has_edms_parameter_count():
    """EDM's ImageNet-64 ADM has 295.9M parameters (EDM paper, table 7 lists 296M)."""
    net = ADMUNet(64, 3, 3, 1000)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(295.9e6, rel=2e-3)


def test_adm_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    from tiny_models import EDM_TINY

    torch.manual_seed(0)
    net = ADMUNet(16, 3, 3, 0, **EDM_TINY)
    calls = []
    net.enc["16x16_block0"].register_forward_pre_hook(lambda *a: calls.append(1))
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            net.enable_gradient_checkpointing()
        net.zero_grad()
        calls.clear()
        (net(x, noise) ** 2).sum().backward()
        grads.append(([p.grad.clone() for p in net.parameters() if p.grad is not None], len(calls)))
    (plain, n_plain), (ckpt, n_ckpt) = grads
    assert (n_plain, n_ckpt) == (1, 2)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_trainer_feeds_the_generator_noise_times_80(tmp_path):
    """In training (not only in sampling), the EDM generator's input is z * 80 at sigma 80."""
    from dmdcli.recipe import load_recipe
    from dmdcli.trainer import DMDTrainer

    _, _, result = _convert(tmp_path)
    assert result.returncode == 0, result.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nout = "{tmp_path / "run"}"\npreview_samples = 0\nlog_with = "none"\n'
                      f'[teacher]\nname = "edm"\nedm.model = "{tmp_path / "teacher"}"\n[train]\nbatch_size = 256\n')
    trainer = DMDTrainer(load_recipe(recipe))
    x_in, t_in, _ = trainer._generator_inputs(256)
    assert t_in.tolist() == [999] * 256
    assert 75 < x_in.std().item() < 85 and trainer.schedule.sigma(t_in[:1]).item() == pytest.approx(80, rel=1e-6)


def test_malformed_teacher_folders_are_one_line(tmp_path, capsys):
    from dmdcli.cli import main

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text("{not json")
    (tmp_path / "t" / "model.safetensors").write_bytes(b"junk")
    assert main(["sample", "--teacher", "edm", "--set", f"teacher.edm.model={tmp_path / 't'}", "--num", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert "config.json is not a teacher config" in capsys.readouterr().err
    (tmp_path / "t" / "config.json").write_text('{"format": "dmd-edm/1", "img_resolution": 16, "img_channels": 3, '
                                                '"label_dim": 0, "model": {}}')
    assert main(["sample", "--teacher", "edm", "--set", f"teacher.edm.model={tmp_path / 't'}", "--num", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert "model.safetensors is not readable safetensors" in capsys.readouterr().err


def test_golden_edm_outputs_of_nvidias_own_code():
    """Our ADM network and EDM preconditioning against outputs of NVIDIA's EDM code (not ours).

    tests/fixtures/edm_golden.safetensors was made outside this repository (NVIDIA's code is
    under a non-commercial licence and is not part of it) by a short script that imports
    training/networks.py, torch_utils/ and dnnlib/ of github.com/NVlabs/edm at commit
    008a4e5316c8e3bfe61a62f874bddba254295afb, on the CPU in float32, with deterministic algorithms:

    1. torch.manual_seed(0); net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=10,
       model_type='DhariwalUNet', model_channels=8, channel_mult=[1, 2], channel_mult_emb=2,
       num_blocks=1, attn_resolutions=[8], dropout=0.0).eval(). (model_channels 8 keeps the file
       small; at 64 the whole network alone would be 12 MB. Its blocks then have no attention
       heads, 64 channels a head, in NVIDIA's network as in ours: part 3 checks attention.)
    2. Perturb: with torch.Generator().manual_seed(2), for each parameter in sorted(named_parameters())
       order, add randn(shape) * 0.05 (so EDM's zero-initialised layers are not zero), then round it
       to float16 (p.copy_(p.half().float())), so that float16 stores the weights exactly.
    3. x = randn(4, 3, 16, 16) from a generator seeded 1; sigma = [0.002, 0.5, 2.0, 80.0]; labels
       [0, 3, 7, 9] as one-hot vectors. Saved: D = net(x, sigma, one_hot), D_uncond = net(x, sigma,
       None), F_x = the output of net.model in the first call (a forward hook), the inputs, and
       net.state_dict() (NVIDIA's `model.` names; floating tensors as float16).
    4. torch.manual_seed(3); block = UNetBlock(in_channels=8, out_channels=64, emb_channels=16,
       attention=True, channels_per_head=64, dropout=0.0, init=dict(init_mode='kaiming_uniform',
       init_weight=sqrt(1/3), init_bias=sqrt(1/3)), init_zero=dict(init_mode='kaiming_uniform',
       init_weight=0, init_bias=0)) (DhariwalUNet's block arguments), perturbed as in 2 with seed 4;
       block_x = randn(2, 8, 4, 4) (seed 5), block_emb = randn(2, 16) (seed 6); saved: block_out =
       block(block_x, block_emb) and its state dict as `block.*`.
    5. safetensors metadata "edm_golden": JSON of the EDMPrecond kwargs, its attributes
       (img_resolution, ..., sigma_max), net.model.init_kwargs (what a pickle carries as
       `_init_kwargs`) and the block's kwargs.
    """
    from pathlib import Path

    from safetensors import safe_open

    from dmdcli.teachers.convert_edm import Persistent, edm_config
    from dmdcli.teachers.edm import UNetBlock

    golden = Path(__file__).parent / "fixtures" / "edm_golden.safetensors"
    with safe_open(str(golden), "pt") as f:
        meta = json.loads(f.metadata()["edm_golden"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    # What `dmd convert-teacher` reads from a pickle: the EDMPrecond record and its DhariwalUNet's
    # _init_kwargs (edm_config), and the state dict named as EDM names it (build_network).
    model = Persistent({"class_name": "DhariwalUNet", "state": {"_init_kwargs": meta["model_init_kwargs"]}})
    record = Persistent({"class_name": "EDMPrecond",
                         "state": {**meta["precond_attributes"], "_modules": {"model": model}}})
    config = edm_config(record, golden)
    state = {k: v.float() for k, v in t.items() if k.startswith("model.")}
    net = build_network(config, state).eval()
    assert {f"model.{k}" for k in net.state_dict()} == set(state)
    denoiser = EDMDenoiser(net, config["label_dim"], EDMSchedule(sigma_data=config["sigma_data"]).sigmas,
                           config["sigma_data"]).eval()
    x, sigma, tol = t["x"], t["sigma"], dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        _, _, c_in, c_noise = edm_preconditioning(sigma.reshape(-1, 1, 1, 1))
        torch.testing.assert_close(net(c_in * x, c_noise.flatten(), t["class_labels"]), t["F_x"], **tol)
        torch.testing.assert_close(denoiser.denoise_sigma(x, sigma, t["labels"]), t["D"], **tol)
        torch.testing.assert_close(denoiser.denoise_sigma(x, sigma, None), t["D_uncond"], **tol)
        torch.testing.assert_close(denoiser.denoise_sigma(x, sigma, torch.full((4,), 10)), t["D_uncond"], **tol)
    # Attention (one head of 64 channels) in a block configured as DhariwalUNet configures them.
    kw = meta["block_kwargs"]
    block = UNetBlock(kw["in_channels"], kw["out_channels"], kw["emb_channels"], attention=kw["attention"]).eval()
    block.load_state_dict({k.removeprefix("block."): v.float() for k, v in t.items() if k.startswith("block.")})
    assert block.num_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(block(t["block_x"], t["block_emb"]), t["block_out"], **tol)
