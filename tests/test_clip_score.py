"""Text-to-image evaluation (issue 29): CLIP score beside FID, and captions sampled and
measured in one command, with a tiny random CLIP of the real architecture."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmdcli.cli import main
from tiny_models import save_tiny_clip, save_tiny_sd


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A one-step student of a tiny SD, trained two iterations on three prompts."""
    root = tmp_path_factory.mktemp("sdrun")
    folder = save_tiny_sd(root / "tiny-sd")
    (root / "prompts.txt").write_text("a red shoe\na cat on a mat\nan old bridge\n")
    recipe = root / "r.toml"
    recipe.write_text(f'[run]\nout = "{root / "run"}"\npreview_samples = 0\n[teacher]\nname = "sd"\nguidance = 1.5\n'
                      f'[teacher.sd]\nmodel = "{folder}"\nprompts = "{root / "prompts.txt"}"\n'
                      f'[train]\nsteps = 1\nbatch_size = 2\ncritic_steps_per_generator_step = 1\nwarmup_steps = 0\n')
    assert main(["distill", str(recipe)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "features.pt"
    torch.manual_seed(0)
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                         torch.nn.Linear(12, 4))).save(str(path))
    return path


def by_hand(images, texts, folder):
    """100 * max(cos, 0) of CLIP's projected embeddings, one image against its own caption."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(images=[im.permute(1, 2, 0).numpy() for im in images], text=texts, return_tensors="pt", truncation=True,
                       padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs.input_ids,
                                                     attention_mask=inputs.attention_mask).pooler_output)
    cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
    return cos, float((100 * cos.clamp(min=0)).mean())


def test_clip_score_is_the_floored_cosine_of_each_image_with_its_own_caption(clip_folder):
    from dmdcli.evaluation.clip_score import clip_score

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 20, 20), dtype=np.uint8))
    texts = ["a red shoe", "a cat", "sky", "an old bridge at dusk", "grass", "zz"]
    cos, expected = by_hand(images, texts, clip_folder)
    assert (cos < 0).any() and (cos > 0).any()   # the floor matters here
    assert clip_score(images, texts, str(clip_folder), batch_size=4) == pytest.approx(expected, rel=1e-5)
    # Its own caption, not another's: the pairing is part of the score.
    assert clip_score(images, texts[1:] + texts[:1], str(clip_folder)) != pytest.approx(expected, rel=1e-3)


def test_captions_sampled_and_measured_in_one_command(tmp_path, sd_run, clip_folder, features):
    """`fid --from RUN --prompts CAPTIONS --clip MODEL` equals `sample --prompts` then `fid --clip`,
    each sample scored against its own caption (caption i % n)."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a blue circle\ngreen grass\n")
    samples = tmp_path / "samples"
    assert main(["sample", str(sd_run), "--num", "4", "--out", str(samples), "--prompts", str(captions)]) == 0
    tensors = load_file(str(samples / "samples.safetensors"))
    assert tensors["label"].tolist() == [0, 1, 0, 1]
    ref = samples / "teacher.safetensors"
    args = ["--ref", str(ref), "--features", str(features), "--clip", str(clip_folder)]
    assert main(["fid", str(samples), *args, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["fid", "--from", str(sd_run), "--num", "4", "--prompts", str(captions), *args,
                 "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    _, expected = by_hand(tensors["image"], ["a blue circle", "green grass"] * 2, clip_folder)
    assert a["clip_score"] == pytest.approx(expected, rel=1e-5) and b["clip_score"] == pytest.approx(expected, rel=1e-4)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4, abs=1e-6)
    # compare reports it beside FID, for the student and the teacher
    assert main(["compare", str(sd_run), "--out", str(tmp_path / "cmp"), "--num", "4", "--teacher-steps", "2",
                 "--ref", str(ref), "--features", str(features), "--clip", str(clip_folder)]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert all(r["clip_score"] >= 0 for r in rows) and len(rows) == 2


def test_clip_problems_are_one_line(tmp_path, sd_run, clip_folder, features, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))   # an empty cache
    samples = tmp_path / "s"
    assert main(["sample", str(sd_run), "--num", "2", "--out", str(samples), "--teacher-steps", "0"]) == 0
    capsys.readouterr()
    ref = ["--ref", str(samples / "samples.safetensors"), "--features", str(features)]
    assert main(["fid", str(samples), *ref, "--clip", "nobody/no-clip"]) == 2
    err = capsys.readouterr().err
    assert "CLIP model 'nobody/no-clip' is not available offline" in err and "Traceback" not in err
    assert main(["fid", str(samples), *ref, "--prompts", "x.txt"]) == 2
    assert "--prompts goes with --from RUN" in capsys.readouterr().err
    assert main(["sample", "--teacher", "gmm", "--num", "2", "--out", str(tmp_path / "g"), "--prompts", "x.txt"]) == 2
    assert "--prompts is for text-to-image teachers (sd); this one is 'gmm'" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"   # samples without captions (an older or pixel teacher's)
    tensors = load_file(str(samples / "samples.safetensors"))
    from safetensors.torch import save_file

    save_file(tensors, str(plain))
    assert main(["fid", str(plain), *ref, "--clip", str(clip_folder)]) == 2
    assert "--clip needs samples of a text teacher (sd)" in capsys.readouterr().err
