"""Stable Diffusion 3 teachers (issue 29) on tiny random-weight models of the real
architectures: an SD3Transformer2DModel, two CLIP encoders with projections, T5, SD3's VAE."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from dmdcli.recipe import SDConfig, TeacherConfig
from tiny_models import save_tiny_sd3


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red shoe\na cat on a mat\nan old bridge at dusk\n")
    return path


def teacher_of(folder):
    from dmdcli.teachers import build_teacher

    return build_teacher(TeacherConfig(name="sd", sd=SDConfig(model=str(folder))))


def sd3_recipe(tmp_path, folder, prompts, steps=2, extra=""):
    path = tmp_path / "sd3.toml"
    path.write_text(f'[run]\nout = "{tmp_path / "runs" / "sd3"}"\npreview_samples = 4\n'
                    f'[teacher]\nname = "sd"\nguidance = 2.0\n[teacher.sd]\nmodel = "{folder}"\nprompts = "{prompts}"\n'
                    f'[train]\nsteps = {steps}\nbatch_size = 2\ncritic_steps_per_generator_step = 1\nwarmup_steps = 0\n'
                    + extra)
    return path


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_teacher_is_the_pipelines_text_encoding_and_cfg_on_v(tmp_path, t5):
    """The packed condition holds exactly what StableDiffusion3Pipeline.encode_prompt makes (with
    T5, or without it as SD3 allows), and x0 is x - sigma * v of the transformer at sigma * 1000
    under standard CFG with the empty prompt."""
    from diffusers import StableDiffusion3Pipeline

    folder = save_tiny_sd3(tmp_path / "sd3", t5=t5)
    teacher = teacher_of(folder)
    assert type(teacher).__name__ == "SD3Teacher" and teacher.family == "flow" and teacher.sample_shape == (4, 16, 16)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    texts = ["a red shoe", "cat"]
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(texts, None, None, max_sequence_length=teacher.t5_length)
    cond = teacher.encode_text(texts)
    assert cond.shape == (2, embeds.shape[1] + 1, 32)
    torch.testing.assert_close(cond[:, :-1], embeds)
    torch.testing.assert_close(cond[:, -1], pooled)   # 32 wide: nothing padded here
    torch.testing.assert_close(teacher.null_condition(2)[:, :-1], neg)
    torch.testing.assert_close(teacher.null_condition(2)[:, -1], neg_pooled)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 400])
    sigma = teacher.schedule.sigmas[t].float()
    assert float(sigma[0]) == 1.0 and 0 < float(sigma[1]) < 1
    with torch.no_grad():
        v_c, v_u = (pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=e,
                                     pooled_projections=p).sample
                    for e, p in ((embeds, pooled), (neg, neg_pooled)))
    expected = x - sigma.view(-1, 1, 1, 1) * (v_u + 2.5 * (v_c - v_u))
    torch.testing.assert_close(teacher.denoise(x, t, cond, 2.5), expected, atol=1e-5, rtol=1e-5)
    # Latents are the VAE's mean shifted then scaled (SD3's shift_factor), decoded the other way.
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vae = pipe.vae
    with torch.no_grad():
        z = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(teacher.encode_images(images), z)
        torch.testing.assert_close(teacher.to_images(z),
                                   vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1))
    # The GAN head reads the middle joint block's image tokens as an 8x8 map (16x16 latents, patch 2).
    from dmdcli.networks import CriticWithHead

    critic = CriticWithHead(teacher.make_critic())
    pred, logits = critic(x, t, cond, real=(x[:1], t[:1], cond[:1]))
    assert pred.shape == x.shape and logits.shape == (3,)
    logits.sum().backward()
    block = critic.critic.unet.transformer_blocks[0]
    assert block.attn.to_q.weight.grad.abs().sum() > 0   # the GAN loss also trains the backbone
    assert critic.critic.unet.proj_out.weight.grad is None   # the logits stop at the middle block


def test_sd3_pairs_distill_with_gan_sample_fid_and_export(tmp_path, sd3_folder, prompts, monkeypatch):
    """End to end: Euler pairs, DMD2 with the GAN head on captioned images, sample, fid, and an
    exported StableDiffusion3Pipeline whose one step equals `dmd sample`'s student."""
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", "--teacher", "sd", "--set", f"teacher.sd.model={sd3_folder}", "--prompts", str(prompts),
                 "--num", "4", "--out", str(pairs), "--steps", "2", "--decode"]) == 0
    shard = load_file(str(pairs / "shard-00000.safetensors"))
    assert shard["noise"].shape == shard["output"].shape == (4, 4, 16, 16) and shard["image"].shape == (4, 3, 32, 32)
    assert json.loads((pairs / "manifest.json").read_text())["sampler"] == "euler"
    images = tmp_path / "captioned"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red square", "a blue circle", "green grass"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    path = sd3_recipe(tmp_path, sd3_folder, prompts, extra=f'[gan]\ngenerator_weight = 1e-3\ncritic_weight = 1e-2\n'
                                                            f'dataset = "imagefolder:{images}"\n')
    assert main(["distill", str(path)]) == 0
    run = tmp_path / "runs" / "sd3"
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(log["loss_gan_c"]) and math.isfinite(log["loss_dm"]) for log in logs)
    critic = load_file(str(run / "checkpoints" / "step-00000002" / "critic.safetensors"))
    assert any(k.startswith("head.") for k in critic)
    (cached,) = (tmp_path / "cache" / "real").iterdir()
    latents = load_file(str(cached / "shard-00000.safetensors"))
    recipe, teacher, generator, _ = load_student(run)
    # The VAE's mean, shifted and scaled (SD3's shift_factor); ids of all three tokenisers side by side.
    assert torch.equal(latents["ids"][0], teacher.token_ids(["a red square"])[0])
    decoded = teacher.to_images(latents["x"][:1].float())
    assert decoded.shape == (1, 3, 32, 32)
    samples = tmp_path / "samples"
    assert main(["sample", str(run), "--num", "4", "--out", str(samples), "--teacher-steps", "2"]) == 0
    features = tmp_path / "features.pt"
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                         torch.nn.Linear(12, 4))).save(str(features))
    assert main(["fid", str(samples), "--ref", str(samples / "teacher.safetensors"), "--features", str(features),
                 "--json", str(tmp_path / "fid.json")]) == 0
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] > 0
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export), "--fid", "n/a (test)"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(export)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    assert "sigmas=[1.0]" in (export / "README.md").read_text()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = student_sample(generator, teacher.schedule, z, teacher.encode_text(["a cat on a mat"]), [999])
    theirs = pipe("a cat on a mat", sigmas=[1.0], guidance_scale=1.0, latents=z, output_type="latent",
                  max_sequence_length=teacher.t5_length).images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_sd3_four_step_student_with_backward_simulation(tmp_path, sd3_folder, prompts):
    path = sd3_recipe(tmp_path, sd3_folder, prompts, extra="[student]\ntimesteps = [999, 749, 499, 249]\n")
    assert main(["distill", str(path)]) == 0
    assert main(["sample", str(tmp_path / "runs" / "sd3"), "--num", "2", "--out", str(tmp_path / "s"),
                 "--teacher-steps", "0"]) == 0
    x = load_file(str(tmp_path / "s" / "samples.safetensors"))["x"]
    assert x.shape == (2, 4, 16, 16) and torch.isfinite(x).all()   # latents (the PNG is decoded)


def test_flux_folder_is_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": [
        "diffusers", "FluxTransformer2DModel"]}))
    assert main(["sample", "--teacher", "sd", "--set", f"teacher.sd.model={folder}", "--num", "1",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a Flux pipeline: Flux teachers are not supported" in err
