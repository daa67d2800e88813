"""Stable Diffusion XL teachers (issue 28, item 1) on tiny random-weight models of the real
architectures: a UNet with text_time added conditions, CLIPTextModel and CLIPTextModelWithProjection."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from dmdcli.recipe import SDConfig, TeacherConfig
from tiny_models import save_tiny_sdxl


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red shoe\na cat on a mat\nan old bridge at dusk\n")
    return path


def sdxl_recipe(tmp_path, folder, prompts, steps=2, extra=""):
    path = tmp_path / "sdxl.toml"
    path.write_text(f'[run]\nout = "{tmp_path / "runs" / "sdxl"}"\npreview_samples = 4\n'
                    f'[teacher]\nname = "sd"\nguidance = 8.0\n[teacher.sd]\nmodel = "{folder}"\nprompts = "{prompts}"\n'
                    f'[train]\nsteps = {steps}\nbatch_size = 2\ncritic_steps_per_generator_step = 1\nwarmup_steps = 0\n'
                    + extra)
    return path


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_teacher_is_the_pipelines_conditioning_and_cfg(tmp_path, force_zeros):
    """Text embeddings, pooled embedding, add_time_ids and the unconditional branch exactly as
    StableDiffusionXLPipeline makes them (zeros, or the empty prompt, as the folder says); x0
    from the UNet by hand under standard CFG."""
    from diffusers import StableDiffusionXLPipeline

    from dmdcli.teachers import build_teacher

    folder = save_tiny_sdxl(tmp_path / "xl", force_zeros=force_zeros)
    teacher = build_teacher(TeacherConfig(name="sd", sd=SDConfig(model=str(folder))))
    assert type(teacher).__name__ == "SDXLTeacher" and teacher.sample_shape == (4, 8, 8)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(["a red shoe", "cat"])
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=16).expand(2, -1)
    cond, uncond = teacher.encode_text(["a red shoe", "cat"]), teacher.null_condition(2)
    torch.testing.assert_close(cond[:, :-1], embeds)
    torch.testing.assert_close(cond[:, -1, :22], torch.cat([pooled, time_ids], dim=-1))
    torch.testing.assert_close(uncond[:, :-1], neg)
    torch.testing.assert_close(uncond[:, -1, :22], torch.cat([neg_pooled, time_ids], dim=-1))
    assert bool((neg == 0).all()) == force_zeros
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 300])
    with torch.no_grad():
        e_c, e_u = (pipe.unet(x, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p, "time_ids": time_ids})
                    .sample for e, p in ((embeds, pooled), (neg, neg_pooled)))
    a = teacher.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    expected = (x - (1 - a).sqrt() * (e_u + 8 * (e_c - e_u))) / a.sqrt()
    # float32 rounding in the UNet, times 8 (guidance) and 1 / sqrt(alpha_bar_999) = 14.6 at t 999
    torch.testing.assert_close(teacher.denoise(x, t, cond, 8.0), expected, atol=1e-3, rtol=1e-3)


def test_sdxl_pairs_distill_with_gan_sample_and_export(tmp_path, sdxl_folder, prompts, monkeypatch):
    """make-pairs, DMD2 with the GAN on captioned images, sample, and an exported
    StableDiffusionXLPipeline (LCMScheduler) whose one step equals `dmd sample`'s student."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from dmdcli.runs import load_student
    from dmdcli.sampling import student_sample

    monkeypatch.setenv("DMD_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", "--teacher", "sd", "--set", f"teacher.sd.model={sdxl_folder}", "--prompts",
                 str(prompts), "--num", "4", "--out", str(pairs), "--steps", "2"]) == 0
    assert load_file(str(pairs / "shard-00000.safetensors"))["output"].shape == (4, 4, 8, 8)
    images = tmp_path / "captioned"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red square", "a blue circle"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    path = sdxl_recipe(tmp_path, sdxl_folder, prompts, extra=f'[gan]\ngenerator_weight = 5e-3\ncritic_weight = 1e-2\n'
                                                            f'dataset = "imagefolder:{images}"\n')
    assert main(["distill", str(path)]) == 0
    run = tmp_path / "runs" / "sdxl"
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(log["loss_gan_c"]) and math.isfinite(log["loss_dm"]) for log in logs)
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "samples"), "--teacher-steps", "2"]) == 0
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export), "--fid", "n/a (test)"]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.config.force_zeros_for_empty_prompt
    assert "StableDiffusionXLPipeline" in (export / "README.md").read_text()
    _, teacher, generator, _ = load_student(run)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = student_sample(generator, teacher.schedule, z, teacher.encode_text(["a cat on a mat"]), [999])
    theirs = pipe("a cat on a mat", num_inference_steps=1, timesteps=[999], guidance_scale=1.0, latents=z,
                  height=16, width=16, output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_sdxl_four_step_student_with_backward_simulation(tmp_path, sdxl_folder, prompts):
    path = sdxl_recipe(tmp_path, sdxl_folder, prompts, extra="[student]\ntimesteps = [999, 749, 499, 249]\n")
    assert main(["distill", str(path)]) == 0
    assert main(["sample", str(tmp_path / "runs" / "sdxl"), "--num", "2", "--out", str(tmp_path / "s"),
                 "--teacher-steps", "0"]) == 0
    x = load_file(str(tmp_path / "s" / "samples.safetensors"))["x"]
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
