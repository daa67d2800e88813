"""CLIP score of text-to-image samples: 100 times the cosine between CLIP's embedding of each
image and of its own caption, floored at 0, averaged (Hessel et al. 2021, the form torchmetrics'
CLIPScore computes and text-to-image papers, DMD2 among them, report beside FID). The CLIP
model is a transformers CLIPModel with its processor, from a local folder or the Hub cache.
"""

from __future__ import annotations

import json

import torch

from ..utils.errors import UserError


def captions_of(tensors: dict, meta: dict) -> list[str]:
    """Each sample's caption: the prompts a text teacher's samples file keeps, by its labels."""
    prompts = json.loads(meta.get("prompts", "null") or "null")
    if not prompts or "label" not in tensors:
        raise UserError("--clip needs samples of a text teacher (sd) made by this version of `dmd sample`, which "
                        "keeps their captions; these samples have none")
    return [prompts[i] for i in tensors["label"].tolist()]


def clip_score(images: torch.Tensor, texts: list[str], model: str, batch_size: int = 64, progress=None) -> float:
    """Mean CLIP score of uint8 images (N x C x H x W) against their captions."""
    from transformers import CLIPModel, CLIPProcessor

    from ..teachers import hub
    from ..utils.processes import process_state

    if len(texts) != len(images):
        raise ValueError(f"{len(images)} images and {len(texts)} captions")
    device = process_state().device
    net = hub.load(CLIPModel, model, what="CLIP model").to(device).eval()
    processor = hub.load(CLIPProcessor, model, what="CLIP model")
    task = progress.add_task("CLIP score", total=len(images)) if progress is not None else None
    total = 0.0
    for start in range(0, len(images), batch_size):
        pixels = [im.permute(1, 2, 0).numpy() for im in images[start:start + batch_size]]
        inputs = processor(images=pixels, text=texts[start:start + batch_size], return_tensors="pt", padding=True,
                           truncation=True).to(device)
        with torch.no_grad():
            out = net(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
        total += float((100 * cos.clamp(min=0)).sum())
        if task is not None:
            progress.advance(task, len(pixels))
    return total / len(images)
