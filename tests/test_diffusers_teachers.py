"""Real diffusers teachers on tiny random-weight models of the real architectures."""

import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from dmdcli.recipe import SDConfig, UNet2DConfig
from tiny_models import save_tiny_sd, save_tiny_unet2d, unet2d_recipe


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return save_tiny_unet2d(tmp_path_factory.mktemp("unet") / "tiny-unet")


@pytest.fixture(scope="module")
def flow_unet_folder(tmp_path_factory):
    return save_tiny_unet2d(tmp_path_factory.mktemp("flow") / "tiny-flow-unet", flow_shift=3.0)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red shoe\na cat on a mat\n\nan old bridge at dusk\n")
    return path


def test_sd_teacher_x0_and_guidance_by_hand(sd_folder, prompts):
    from dmdcli.teachers.diffusers_unets import SDTeacher

    teacher = SDTeacher(SDConfig(model=str(sd_folder), prompts=str(prompts)))
    assert teacher.prompts == ["a red shoe", "a cat on a mat", "an old bridge at dusk"]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *teacher.sample_shape, generator=g)
    t = torch.tensor([999, 400])
    cond = teacher.encode_condition(torch.tensor([0, 2]))
    x0 = teacher.denoise(x_t, t, cond, guidance=4.5)
    assert x0.shape == x_t.shape == (2, 4, 8, 8)
    # By hand: the UNet's eps with the empty prompt and with the prompt, standard CFG, then x0.
    unet = teacher.real.unet
    empty = teacher.encode_text(["", ""])
    with torch.no_grad():
        eps_u = unet(x_t, t, encoder_hidden_states=empty).sample
        eps_c = unet(x_t, t, encoder_hidden_states=cond).sample
    eps = eps_u + 4.5 * (eps_c - eps_u)
    a = teacher.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0, ((x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).float(),
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x0, teacher.denoise(x_t, t, cond, guidance=1.0))


def test_sd_v_prediction_teacher(tmp_path):
    from dmdcli.teachers.diffusers_unets import SDTeacher

    folder = save_tiny_sd(tmp_path / "v", prediction_type="v_prediction")
    teacher = SDTeacher(SDConfig(model=str(folder)))
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        v = teacher.real.unet(x_t, t, encoder_hidden_states=teacher.encode_text([""])).sample
    a = teacher.schedule.alphas_cumprod[500]
    expected = a.sqrt() * x_t.double() - (1 - a).sqrt() * v.double()
    torch.testing.assert_close(teacher.denoise(x_t, t, None), expected.float(), atol=1e-5, rtol=1e-5)


def sd_recipe(tmp_path, sd_folder, prompts, steps=2):
    path = tmp_path / "sd.toml"
    path.write_text(f"""
[run]
out = "{tmp_path / 'runs' / 'sd'}"
checkpoint_every = 1
log_every = 1
preview_samples = 4

[teacher]
name = "sd"
guidance = 1.75

[teacher.sd]
model = "{sd_folder}"
prompts = "{prompts}"

[train]
steps = {steps}
batch_size = 2
critic_steps_per_generator_step = 1
lr_generator = 1e-5
lr_critic = 1e-5
warmup_steps = 0
""")
    return path


def test_sd_distill_two_iterations_writes_checkpoint_and_resumes(tmp_path, sd_folder, prompts, capsys):
    path = sd_recipe(tmp_path, sd_folder, prompts)
    assert main(["distill", str(path)]) == 0
    run = tmp_path / "runs" / "sd"
    ckpt = run / "checkpoints" / "step-00000002"
    weights = load_file(str(ckpt / "generator.safetensors"))
    assert any(k.startswith("unet.") for k in weights)
    assert (run / "previews" / "step-00000002.png").is_file()
    assert main(["distill", str(path), "--set", "train.steps=3"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-00000003").is_dir()


def test_sd_without_prompts_is_one_line(tmp_path, sd_folder, capsys):
    path = sd_recipe(tmp_path, sd_folder, "")
    path.write_text(path.read_text().replace('prompts = ""\n', ""))
    assert main(["distill", str(path)]) == 2
    assert "the sd teacher needs training prompts: set teacher.sd.prompts" in capsys.readouterr().err


def test_hub_id_offline_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))   # an empty cache
    assert main(["make-pairs", "--teacher", "sd15", "--num", "2", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "teacher model 'stable-diffusion-v1-5/stable-diffusion-v1-5' is not available offline" in err
    assert "give a local folder made by save_pretrained" in err and "Traceback" not in err


def test_missing_local_folder_is_one_line(capsys, tmp_path):
    code = main(["make-pairs", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={tmp_path}/none",
                 "--num", "2", "--out", str(tmp_path / "p")])
    assert code == 2
    assert f"model folder not found: {tmp_path}/none" in capsys.readouterr().err


def test_unet2d_make_pairs_and_distill(tmp_path, unet_folder):
    from dmdcli.teachers.diffusers_unets import UNet2DTeacher

    teacher = UNet2DTeacher(UNet2DConfig(model=str(unet_folder)))
    assert teacher.num_classes == 3 and teacher.sample_shape == (1, 16, 16)
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={unet_folder}",
                 "--num", "6", "--out", str(pairs), "--steps", "2", "--guidance", "2.0"]) == 0
    shard = load_file(str(pairs / "shard-00000.safetensors"))
    assert shard["noise"].shape == shard["output"].shape == (6, 1, 16, 16)
    assert shard["label"].tolist() == [0, 1, 2, 0, 1, 2]
    recipe = unet2d_recipe(tmp_path / "u.toml", unet_folder, tmp_path / "runs" / "u", steps=2,
                           extra=f'method = "dmd"\n[regression]\npairs = "{pairs}"\n')
    assert main(["distill", str(recipe)]) == 0
    out = tmp_path / "samples"
    assert main(["sample", str(tmp_path / "runs" / "u"), "--num", "4", "--out", str(out), "--teacher-steps", "2"]) == 0
    assert load_file(str(out / "samples.safetensors"))["x"].shape == (4, 1, 16, 16)
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_teacher_alone_by_global_index(tmp_path, unet_folder):
    out = tmp_path / "t"
    assert main(["sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={unet_folder}", "--num", "7",
                 "--out", str(out), "--teacher-steps", "2", "--guidance", "1.5", "--batch-size", "3"]) == 0
    tensors = load_file(str(out / "samples.safetensors"))
    assert tensors["x"].shape == (7, 1, 16, 16)
    assert tensors["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Batching does not change what sample i is.
    out2 = tmp_path / "t2"
    assert main(["sample", "--teacher", "unet2d", "--set", f"teacher.unet2d.model={unet_folder}", "--num", "7",
                 "--out", str(out2), "--teacher-steps", "2", "--guidance", "1.5", "--batch-size", "7"]) == 0
    torch.testing.assert_close(load_file(str(out2 / "samples.safetensors"))["x"], tensors["x"], atol=1e-3, rtol=1e-3)
    from PIL import Image

    assert Image.open(out / "samples.png").size == (3 * 18 + 2, 2 * 18 + 2)   # 3 classes a row, 2 rows


def test_sample_needs_a_run_or_a_teacher(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "x")]) == 2
    assert "give a run folder to sample a student, or --teacher NAME" in capsys.readouterr().err


def test_sd_make_pairs_stores_latents_prompts_and_decoded_images(tmp_path, sd_folder, prompts):
    out = tmp_path / "pairs"
    assert main(["make-pairs", "--teacher", "sd", "--set", f"teacher.sd.model={sd_folder}", "--prompts", str(prompts),
                 "--num", "4", "--out", str(out), "--steps", "2", "--decode"]) == 0
    shard = load_file(str(out / "shard-00000.safetensors"))
    assert shard["noise"].shape == shard["output"].shape == (4, 4, 8, 8)          # latents
    assert shard["label"].tolist() == [0, 1, 2, 0]                                   # prompt i % 3
    assert shard["image"].dtype == torch.uint8 and shard["image"].shape == (4, 3, 16, 16)
    assert (out / "prompts.txt").read_text().splitlines() == ["a red shoe", "a cat on a mat", "an old bridge at dusk"]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["guidance"] == 3.0 and manifest["teacher"]["model"] == str(sd_folder)   # the paper's default
    assert main(["make-pairs", "--teacher", "sd", "--set", f"teacher.sd.model={sd_folder}", "--prompts", str(prompts),
                 "--num", "4", "--out", str(out), "--steps", "2", "--decode", "--verify", "4"]) == 0


def test_export_sd_student_is_a_one_step_pipeline(tmp_path, sd_folder, prompts, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    assert main(["distill", str(sd_recipe(tmp_path, sd_folder, prompts, steps=1))]) == 0
    run = tmp_path / "runs" / "sd"
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--fid", "n/a (test)"]) == 0
    assert "num_inference_steps=1, timesteps=[999]" in (out / "README.md").read_text()
    # The card's usage names the folder as given: a relative --out stays relative (no machine path).
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--out", "export-rel"]) == 0
    card = (tmp_path / "export-rel" / "README.md").read_text()
    assert 'from_pretrained("export-rel")' in card and f'from_pretrained("{tmp_path}' not in card
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    recipe, teacher, generator, _ = load_student(run)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_text(["a cat on a mat"])
    ours = student_sample(generator, teacher.schedule, z, cond, [999])
    theirs = pipe("a cat on a mat", num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [999, 600])
def test_export_unet2d_student_snippet_reproduces_samples(tmp_path, unet_folder, t):
    """The exported LCMScheduler reproduces the student at its conditioning timestep: 999, or
    600, where the DDPM Fashion-MNIST recipes read their one-step student (an epsilon output, read
    as x0 at t = 600)."""
    from diffusers import LCMScheduler, UNet2DModel

    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    recipe = unet2d_recipe(tmp_path / "u.toml", unet_folder, tmp_path / "runs" / "u",
                           extra=f"[student]\ntimesteps = [{t}]\n")
    assert main(["distill", str(recipe)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / "u"), "--out", str(out)]) == 0
    unet = UNet2DModel.from_pretrained(out, subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(timesteps=[t])
    x = z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 3
    with torch.no_grad():
        for s in scheduler.timesteps:
            x = scheduler.step(unet(x, s, class_labels=labels).sample, s, x).prev_sample
    _, teacher, generator, _ = load_student(tmp_path / "runs" / "u")
    torch.testing.assert_close(x, student_sample(generator, teacher.schedule, z, labels, [t]), atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    assert "class_labels=labels" in card and f"scheduler.set_timesteps(timesteps=[{t}])" in card


def test_flow_unet2d_teacher_by_hand(flow_unet_folder):
    """A UNet2DModel beside a FlowMatchEulerDiscreteScheduler is a flow teacher: at index t it
    reads the timestep sigma_t * 1000 and predicts the velocity (x0 = x_t - sigma_t v, CFG on v);
    its ODE is diffusers' own Euler loop on the UNet."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from dmdcli.sampling import teacher_ode
    from dmdcli.teachers.diffusers_unets import UNet2DTeacher

    teacher = UNet2DTeacher(UNet2DConfig(model=str(flow_unet_folder)))
    assert (teacher.family, teacher.prediction_type, teacher.default_sampler) == ("flow", "flow", "euler")
    unet = UNet2DModel.from_pretrained(flow_unet_folder, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 1, 16, 16, generator=g), torch.randn(3, 1, 16, 16, generator=g)
    t, labels, null = torch.tensor([999, 500, 20]), torch.tensor([0, 1, 2]), torch.full((3,), 3)
    sigma = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_unet_folder, subfolder="scheduler").sigmas.flip(0)[t]
    with torch.no_grad():
        v_c, v_u = (unet(x, sigma * 1000, class_labels=c).sample for c in (labels, null))
    expected = x - sigma.view(-1, 1, 1, 1) * (v_u + 2.0 * (v_c - v_u))
    torch.testing.assert_close(teacher.denoise(x, t, labels, guidance=2.0), expected, atol=1e-5, rtol=1e-5)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_unet_folder, subfolder="scheduler")
    sched.set_timesteps(4)
    y = z
    with torch.no_grad():
        for s in sched.timesteps:
            y = sched.step(unet(y, s.expand(3), class_labels=labels).sample, s, y).prev_sample
    torch.testing.assert_close(teacher_ode(teacher, z, labels, 4, 1.0, "euler"), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [999, 600])
def test_flow_unet2d_distill_sample_and_export(tmp_path, flow_unet_folder, t):
    """DMD2 on a flow teacher end to end; the export's FlowMatchLCMScheduler snippet reproduces
    the one-step student at its timestep."""
    from diffusers import FlowMatchLCMScheduler, UNet2DModel

    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    recipe = unet2d_recipe(tmp_path / "f.toml", flow_unet_folder, tmp_path / "runs" / "f", steps=2,
                           extra=f"[student]\ntimesteps = [{t}]\n")
    assert main(["distill", str(recipe)]) == 0
    out = tmp_path / "samples"
    assert main(["sample", str(tmp_path / "runs" / "f"), "--num", "4", "--out", str(out), "--teacher-steps", "2"]) == 0
    assert load_file(str(out / "teacher.safetensors"))["x"].shape == (4, 1, 16, 16)
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / "f"), "--out", str(export)]) == 0
    unet = UNet2DModel.from_pretrained(export, subfolder="unet")
    _, teacher, generator, _ = load_student(tmp_path / "runs" / "f")
    scheduler = FlowMatchLCMScheduler.from_pretrained(export, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[float(teacher.schedule.sigmas[t])])
    x = z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 3
    with torch.no_grad():
        for s in scheduler.timesteps:
            x = scheduler.step(unet(x, s, class_labels=labels).sample, s, x).prev_sample
    torch.testing.assert_close(x, student_sample(generator, teacher.schedule, z, labels, [t]), atol=1e-4, rtol=1e-4)
    assert "FlowMatchLCMScheduler" in (export / "README.md").read_text()
    from dmdcli.teachers.diffusers_unets import UNet2DTeacher

    assert UNet2DTeacher(UNet2DConfig(model=str(export))).family == "flow"   # an export is a flow teacher too


def test_export_refuses_vector_students(tmp_path, tiny_recipe, capsys):
    assert main(["distill", str(tiny_recipe(steps=2, checkpoint_every=2))]) == 0
    assert main(["export", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "e")]) == 2
    assert "export writes students of the sd, unet2d and edm teachers" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_export_never_overwrites_a_folder_it_did_not_write(tmp_path, unet_folder, capsys):
    recipe = unet2d_recipe(tmp_path / "u.toml", unet_folder, tmp_path / "runs" / "u")
    assert main(["distill", str(recipe)]) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(["export", str(tmp_path / "runs" / "u"), "--out", str(precious)]) == 2
    assert "exists and is not an earlier export" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "e"
    assert main(["export", str(tmp_path / "runs" / "u"), "--out", str(out)]) == 0
    assert main(["export", str(tmp_path / "runs" / "u"), "--out", str(out)]) == 0   # an earlier export: replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sd_gan_on_captioned_images(tmp_path, sd_folder, prompts, monkeypatch, capsys):
    """DMD2's second SD stage: real images with captions, VAE-encoded and tokenised once and
    cached, go through the critic with their own caption's text embedding."""
    import json

    import numpy as np
    from PIL import Image

    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "captioned"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red square", "a blue circle", "green grass", "a grey cat"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    path = sd_recipe(tmp_path, sd_folder, prompts)
    path.write_text(path.read_text() + f'\n[gan]\ngenerator_weight = 1e-3\ncritic_weight = 1e-2\n'
                                       f'dataset = "imagefolder:{images}"\n')
    assert main(["distill", str(path)]) == 0
    logs = [json.loads(line) for line in (tmp_path / "runs" / "sd" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(log["loss_gan_c"]) for log in logs)
    (cached,) = (tmp_path / "cache" / "real").iterdir()       # prepared once: bf16 latents in row shards
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["captions"] == ["a red square", "a blue circle", "green grass", "a grey cat"]
    latents = load_file(str(cached / "shard-00000.safetensors"))["x"]
    assert latents.shape == (4, 4, 8, 8) and latents.dtype == torch.bfloat16   # 16 px (the tiny VAE's 2x)
    from dmdcli.real_data import RealData
    from dmdcli.recipe import load_recipe
    from dmdcli.teachers import build_teacher

    teacher = build_teacher(load_recipe(path).teacher)
    real = RealData(teacher, f"imagefolder:{images}")         # from the cache, the same latents
    x, ids = real.batch(3, torch.Generator().manual_seed(0))
    idx = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(0))   # the rows batch() draws
    assert torch.equal(x, latents[idx].float())
    stored = load_file(str(cached / "shard-00000.safetensors"))["ids"]   # tokenised once, when prepared
    assert stored.dtype == torch.int32 and torch.equal(ids, stored[idx])
    cond = real.condition(ids, "cpu")
    assert torch.equal(cond, teacher.encode_text([real.captions[i] for i in idx.tolist()]))
    # Without a text column: one line saying what to add.
    (images / "metadata.jsonl").unlink()
    capsys.readouterr()
    (tmp_path / "b").mkdir()
    bare = sd_recipe(tmp_path / "b", sd_folder, prompts)
    bare.write_text(bare.read_text() + f'\n[gan]\ngenerator_weight = 1e-3\ncritic_weight = 1e-2\n'
                                       f'dataset = "imagefolder:{images}"\n')
    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache2"))
    assert main(["distill", str(bare)]) == 2
    assert "needs an image column and a text, caption or prompt column" in capsys.readouterr().err
