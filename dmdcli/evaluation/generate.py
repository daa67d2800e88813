"""Making sample sets from a student run or from a teacher: batches, timing, files.

The noise of sample i is a pure function of (seed, i), from another stream than the noise of
pair i (`sample_noise`), and its condition is assigned by global index (class i % classes,
prompt i % prompts), so any subset can be regenerated and several ranks never repeat one
order. Under `accelerate launch` each process makes a contiguous share of the indices and
writes it to its own part file; the main process joins the parts in index order, so the
files are the same for any number of processes.

A rerun of a stopped call resumes: every finished batch is kept under OUT/.partial/ (a folder
per sampler setting, named by a hash of it: the teacher and its weights, seed, steps,
guidance, sampler, or the student's timesteps and weights) and read back instead of made
again; the folder is removed once the sample files are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from .samples import sample_tensors, save_samples
from ..pairs import index_noise
from ..sampling import student_sample, teacher_ode
from ..teachers import uint8_images


def sample_noise(seed: int, indices, shape, renoise: int = 0) -> torch.Tensor:
    """The starting noise of samples (renoise 0) and a few-step student's re-noise k: never
    the noise of a pair, whatever the seeds (stream 1; the pairs' is stream ()), so a DMD v1
    student is measured on noises it was not regressed on."""
    return index_noise(seed, indices, shape, stream=(1, renoise))


def _batched(fn, indices: range, batch_size: int, teacher, seed: int, progress=None, label: str = "samples",
             cache: Path | None = None):
    """fn(noise, cond, idx) over batches; noise and conditions are functions of the index.
    With a rich `progress`, a task `label` advances by each batch. With a `cache` folder each
    batch made is saved there, and a batch already there is read back instead of made.
    The rate (samples per second) times the fn calls: not the per-index starting noise made
    on the CPU, nor the conditions (a text encoder's prompts), nor an untimed one-sample call
    first that pays CUDA's lazy start-up. Few-step students make their re-noise inside fn.
    It is None when no batch was made (all read back, or an empty share)."""
    def inputs(idx):
        labels = teacher.condition_ids(idx)
        z = sample_noise(seed, idx, teacher.sample_shape).to(getattr(teacher, "device", "cpu"))
        return z, teacher.encode_condition(labels.to(z.device) if labels is not None else None)

    parts, seconds, made = [], 0.0, 0
    task = progress.add_task(label, total=len(indices)) if progress is not None else None
    for start in range(indices.start, indices.stop, batch_size):
        idx = range(start, min(start + batch_size, indices.stop))
        path = cache / f"{idx.start:09d}-{idx.stop:09d}.safetensors" if cache is not None else None
        x = _read_batch(path, (len(idx), *teacher.sample_shape)) if path is not None else None
        if x is None:
            if not made:
                first = range(idx.start, idx.start + 1)
                fn(*inputs(first), first).cpu()   # warm-up, untimed
            z, cond = inputs(idx)
            if z.is_cuda:
                torch.cuda.synchronize(z.device)   # nothing queued before this batch is timed with it
            t0 = time.perf_counter()
            x = fn(z, cond, idx).cpu()   # .cpu() waits for the device
            seconds += time.perf_counter() - t0
            made += len(idx)
            if path is not None:
                _write_batch(path, x)
        parts.append(x)
        if task is not None:
            progress.advance(task, len(idx))
    empty = torch.empty(0, *teacher.sample_shape)
    return (torch.cat(parts) if parts else empty), (made / max(seconds, 1e-9) if made else None)


def _read_batch(path: Path, shape: tuple) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        x = load_file(str(path))["x"] if path.is_file() else None
    except (SafetensorError, OSError, KeyError):
        return None
    return x if x is not None and tuple(x.shape) == tuple(shape) else None


def _write_batch(path: Path, x: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from ..utils.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({"x": x.contiguous()}, str(tmp))


def weights_digest(*modules) -> str:
    """SHA-256 of networks' weights (and their dtypes): samples or rows made with other weights
    are not reused."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_identity(teacher) -> dict:
    """What fixes a teacher's samples: its description, and the weights of every network it
    samples with (denoiser, VAE, text encoder; with their dtypes; not the private trainable
    copy that generators and critics start from)."""
    nets = [v for k, v in sorted(vars(teacher).items()) if isinstance(v, torch.nn.Module) and not k.startswith("_")]
    return {**teacher.describe(), "weights": weights_digest(*nets)}


def _cache_folder(out: Path, setting: dict) -> Path:
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]
    return out / ".partial" / f"{setting['who']}-{digest}"


def _share(num: int, rank: int, world: int) -> range:
    """This process's contiguous share of range(num)."""
    per, extra = divmod(num, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def _student(generator, teacher, timesteps, seed: int, precision: str = "no"):
    """fn(noise, cond, idx) of a student; few-step students re-noise with per-index noise too.
    precision: the run's train.mixed_precision, so a student is sampled as it was trained
    (autocast; the samples come back as float32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def run(z, c, idx):
        renoise = [sample_noise(seed, idx, teacher.sample_shape, k + 1) for k in range(len(timesteps) - 1)]
        with torch.autocast(z.device.type, dtype=dtype, enabled=dtype is not None):
            x = student_sample(generator, teacher.schedule, z, c, list(timesteps), renoise=renoise)
        return x.float()
    return run


def _decoded(teacher, x):
    """Latent teachers: the decoded uint8 images too (for FID); None for pixel teachers."""
    if not hasattr(teacher, "vae"):
        return None
    return uint8_images(teacher.to_images(x))


def make_samples(out: Path, num: int, teacher, **settings) -> dict:
    """Write samples.safetensors (the student's, or the teacher's when there is no student),
    teacher.safetensors beside a student's when teacher_steps > 0, and samples.png; with
    images="png" also one PNG per sample (images/, teacher-images/), with "npz" the uint8
    images as samples.npz / teacher.npz (arr_0: N x H x W x C, as ADM's and EDM's FID tools read).
    Returns {who: (samples, samples per second of all processes, steps)} on the main process.
    `progress` (a rich Progress) shows the main process's share, one task per sampler.
    One call at a time per folder: a second is refused (it would delete the first's kept batches).
    settings: _make_samples's keywords."""
    from ..utils.processes import folder_in_use

    with folder_in_use(out, "`dmd sample` or `dmd compare`", "let it finish, or choose another --out"):
        return _make_samples(out, num, teacher, **settings)


def _make_samples(out: Path, num: int, teacher, *, generator=None, timesteps=(999,), student_source: str = "",
                  precision: str = "no", teacher_steps: int = 50, guidance: float = 1.0, sampler: str = "ddim", seed: int = 0,
                  batch_size: int = 256, images: str = "none", progress=None) -> dict:
    from ..utils.processes import process_state

    state = process_state()
    progress = progress if state.is_main_process else None
    mine = _share(num, state.process_index, state.num_processes)
    common = {"teacher": teacher_identity(teacher), "seed": seed}
    caches = {}
    if generator is not None:
        caches["student"] = _cache_folder(out, {**common, "who": "student", "timesteps": list(timesteps),
                                                "weights": weights_digest(generator), "precision": precision})
    if teacher_steps:
        caches["teacher"] = _cache_folder(out, {**common, "who": "teacher", "steps": teacher_steps,
                                                "guidance": guidance, "sampler": sampler})
    if state.is_main_process and (out / ".partial").is_dir():   # a stopped call's batches of other settings
        for stale in set((out / ".partial").iterdir()) - set(caches.values()):
            shutil.rmtree(stale, ignore_errors=True)
    results = {}   # each process decodes its own share
    if generator is not None:
        x, rate = _batched(_student(generator, teacher, timesteps, seed, precision), mine, batch_size, teacher, seed,
                           progress, f"student, {len(timesteps)} step(s)", cache=caches["student"])
        results["student"] = (x, rate, len(timesteps), _decoded(teacher, x))
    if teacher_steps:
        x, rate = _batched(lambda z, c, idx: teacher_ode(teacher, z, c, teacher_steps, guidance, sampler),
                           mine, batch_size, teacher, seed, progress, f"teacher, {teacher_steps} step(s)",
                           cache=caches["teacher"])
        results["teacher"] = (x, rate, teacher_steps, _decoded(teacher, x))
    out.mkdir(parents=True, exist_ok=True)
    names = {who: ("samples" if who == "student" or "student" not in results else "teacher") for who in results}
    if images == "png":   # each process writes its own share: disjoint files
        for who, (x, _, _, img) in results.items():
            _write_pngs(out / ("images" if names[who] == "samples" else "teacher-images"), x, img, mine)
    if state.num_processes > 1:
        results = _join_ranks(out, results, state)
        if not state.is_main_process:
            return {}
    labels = teacher.condition_ids(range(num))
    teacher_source = f"teacher {sampler} {teacher_steps} steps, guidance {guidance}"
    sources = {"student": student_source, "teacher": teacher_source}
    for who, (x, _, _, img) in results.items():
        save_samples(out / f"{names[who]}.safetensors", x, labels, teacher.describe(), sources[who], img,
                     getattr(teacher, "prompts", None))
        if images == "npz":
            _write_npz(out / f"{names[who]}.npz", x, img, labels)
    main = results.get("student", results.get("teacher"))[0]
    other = results["teacher"][0] if "student" in results and "teacher" in results else None
    teacher.save_preview(main, other, labels, out / "samples.png", title=student_source or teacher_source)
    shutil.rmtree(out / ".partial", ignore_errors=True)   # written in full: the kept batches are done with
    return {who: r[:3] for who, r in results.items()}


def _uint8(x, img) -> torch.Tensor:
    from .fid import to_uint8_images

    return to_uint8_images({"x": x, **({"image": img} if img is not None else {})})


def _write_pngs(folder: Path, x, img, indices: range) -> None:
    from PIL import Image

    from ..utils.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in zip(indices, _uint8(x, img).permute(0, 2, 3, 1).numpy()):
        with atomic_path(folder / f"{i:06d}.png") as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")


def _write_npz(path: Path, x, img, labels) -> None:
    import numpy as np

    from ..utils.io import atomic_path

    arrays = {"arr_0": _uint8(x, img).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["label"] = labels.numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def student_tensors(run, num: int, seed: int = 0, batch_size: int = 256, progress=None,
                    prompts: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) as a samples file holds them, of a run's student, made in memory:
    the same samples `dmd sample RUN --num N --seed S [--prompts P]` would write."""
    from ..runs import load_student

    recipe, teacher, generator, _ = load_student(run)
    if prompts is not None:
        use_prompts(teacher, prompts)
    tensors = generator_tensors(generator, teacher, recipe.student.timesteps, num, seed, batch_size, progress,
                                recipe.train.mixed_precision)
    meta = {"teacher": json.dumps(teacher.describe())}
    if getattr(teacher, "prompts", None):
        meta["prompts"] = json.dumps(teacher.prompts)
    return tensors, meta


def use_prompts(teacher, spec: str) -> None:
    """Sample a text teacher (or its student) on these prompts (a file or DATASET[:column])
    instead of its recipe's: the captions of an evaluation set, such as COCO-2014's 30K."""
    from ..utils.errors import UserError

    if not hasattr(teacher, "prompts"):
        raise UserError(f"--prompts is for text-to-image teachers (sd); this one is {teacher.name!r}")
    teacher.prompts, teacher._prompt_ids = teacher._read_prompts(spec), None


def generator_tensors(generator, teacher, timesteps, num: int, seed: int = 0, batch_size: int = 256,
                      progress=None, precision: str = "no") -> dict:
    """A generator's samples at `timesteps` as a samples file holds them, made in memory with
    `dmd sample`'s per-index noise and classes (for one not saved as a run: bench/)."""
    x, _ = _batched(_student(generator, teacher, timesteps, seed, precision), range(num), batch_size, teacher, seed,
                    progress, f"student, {len(timesteps)} step(s)")
    return sample_tensors(x, teacher.condition_ids(range(num)), _decoded(teacher, x))


def _join_ranks(out: Path, results: dict, state) -> dict:
    """Every process writes its share to a part file; the main process reads them back in
    rank order (contiguous shares: index order) and removes them."""
    from safetensors.torch import load_file, save_file

    from ..utils.io import atomic_path

    for who, (x, rate, steps, images) in results.items():   # NaN: this rank made nothing
        part = {"x": x.contiguous(), "rate": torch.tensor([float("nan") if rate is None else rate],
                                                          dtype=torch.float64)}
        if images is not None:
            part["image"] = images.contiguous()
        with atomic_path(out / f".{who}.part-{state.process_index}.safetensors") as tmp:
            save_file(part, str(tmp))
    state.wait_for_everyone()
    joined = {}
    if state.is_main_process:
        for who, (_, _, steps, images) in results.items():
            files = [out / f".{who}.part-{r}.safetensors" for r in range(state.num_processes)]
            parts = [load_file(str(f)) for f in files]
            rates = [p["rate"].item() for p in parts if not p["rate"].isnan().any()]
            joined[who] = (torch.cat([p["x"] for p in parts]), float(sum(rates)) if rates else None, steps,
                           torch.cat([p["image"] for p in parts]) if images is not None else None)
            for f in files:
                f.unlink()
    state.wait_for_everyone()
    return joined
