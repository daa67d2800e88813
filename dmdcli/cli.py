"""The `dmd` command: thin Typer wrappers over the engine. User mistakes raise UserError,
printed here as one line with exit code 2; anything else keeps its traceback (exit 1)."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .utils.errors import UserError
from .utils.stopping import Stopped

try:  # Typer 0.20+ vendors click; older versions use the click package.
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distribution Matching Distillation: one-step generators from diffusion teachers.")
console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line


def progress_bar(extra: str = ""):
    """The shared rich bar on this module's console (dmdcli.utils.progress); quiet on the processes
    other than the main one under accelerate launch, which share its terminal."""
    from .utils.processes import process_state

    from .utils.progress import progress_bar as bar

    return bar(console, extra, quiet=not process_state().is_main_process)


@app.command()
def distill(recipe: Path = typer.Argument(..., help="TOML recipe, e.g. recipes/toy2d.toml"),
            set_: List[str] = typer.Option([], "--set", help="override: section.key=value (TOML value)"),
            dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe, parameter counts, "
                                                                  "memory and passes per iteration, and stop")):
    """Distil a teacher into a one-step generator. Rerun the same command to resume."""
    from .recipe import load_recipe, to_toml

    r = load_recipe(recipe, set_)
    if dry_run:
        from .dryrun import report

        typer.echo(to_toml(r) + "\n" + report(r), nl=False)
        return
    from .runner import distill as run_distill

    run_dir = run_distill(r, lambda: progress_bar("{task.fields[losses]}"), console)
    console.print(f"run folder: {run_dir}")


@app.command("train-teacher")
def train_teacher(recipe: Path = typer.Argument(..., help="TOML recipe, e.g. recipes/fashion-teacher.toml"),
                  set_: List[str] = typer.Option([], "--set", help="override: section.key=value (TOML value)"),
                  dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe and stop")):
    """Train a class-conditional diffusion teacher (vp UNet2DModel or EDM ADM) on an image dataset. Rerun to resume."""
    from .recipe import TeacherRecipe, load_recipe, to_toml
    from .teacher_training import train_teacher as run

    r = load_recipe(recipe, set_, TeacherRecipe)
    if dry_run:
        typer.echo(to_toml(r), nl=False)
        return
    out, used_with = run(r, lambda: progress_bar("{task.fields[losses]}"), console)
    console.print(f"teacher saved: {out} (use it with {used_with})")


@app.command("recipe-keys")
def recipe_keys():
    """Print every recipe key with its type, default and meaning (docs/recipes.md is this output)."""
    from .recipe_keys import markdown

    typer.echo(markdown())


@app.command("convert-teacher")
def convert_teacher(source: Path = typer.Argument(..., help="EDM pickle, e.g. edm-imagenet-64x64-cond-adm.pkl"),
                    out: Path = typer.Option(..., help="new folder for config.json + model.safetensors"),
                    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                                      help="allow the pickle to import code outside tensors and "
                                                           "plain containers (it can then run anything)")):
    """Convert NVIDIA's EDM network pickle to a teacher folder (teacher.edm.model), reading the
    pickle without importing or running the code stored in it."""
    from .teachers.convert_edm import convert_edm

    cfg = convert_edm(source, out, trust_pickle)
    m = cfg["model"]
    console.print(f"wrote {out}: ADM {cfg['img_resolution']}px, {cfg['label_dim']} classes, "
                  f"{m['model_channels']} channels x {m['channel_mult']}; in a recipe: teacher.name = \"edm\", "
                  f"teacher.edm.model = \"{out}\"", highlight=False)


@app.command("convert-lpips")
def convert_lpips(trunk: Path = typer.Argument(..., help="torchvision's ImageNet weights of the trunk, e.g. "
                                                         "vgg16-397923af.pth"),
                  out: Path = typer.Option(..., help="safetensors file to write"),
                  net: str = typer.Option("vgg", help="vgg or alex"),
                  linear: Optional[Path] = typer.Option(None, help="LPIPS linear layers (default: the lpips "
                                                                   "package's own v0.1 file)"),
                  trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                                    help="allow reading the two .pth files (pickles; torch's "
                                                         "weights-only loader)")):
    """LPIPS weights for regression.distance = "lpips", as one safetensors file
    (regression.lpips_weights): training then reads no pickle."""
    from .perceptual import convert_lpips as convert

    info = convert(trunk, out, net, linear, trust_pickle)
    console.print(f"wrote {out}: LPIPS-{info['net']} ({info['tensors']} tensors); in a recipe: "
                  f"regression.distance = \"lpips\", regression.lpips_weights = \"{out}\"", highlight=False)


def _teacher_from(name: str, recipe: Optional[Path], set_: List[str], guidance: Optional[float],
                  defaults: dict[str, float]):
    """(teacher, guidance) for --teacher NAME (gmm, sd, unet2d, or an alias such as sd15) with
    settings from --recipe/--set. Guidance: --guidance, else the recipe's or --set
    teacher.guidance, else the command's default for the teacher (`defaults`, else 1)."""
    from .teachers.hub import ALIASES
    from .recipe import load_recipe, recipe_from_data
    from .teachers import build_teacher

    data = {"teacher": {"name": "sd", "sd": {"model": name}}} if name in ALIASES else {"teacher": {"name": name}}
    cfg = load_recipe(recipe, set_).teacher if recipe else recipe_from_data(data, set_).teacher
    if recipe and cfg.name != data["teacher"]["name"]:
        raise UserError(f"--teacher {name} but recipe {recipe} names teacher {cfg.name!r}")
    if guidance is None:
        given = recipe or any(s.startswith("teacher.guidance=") for s in set_)
        guidance = cfg.guidance if given else defaults.get(cfg.name, 1.0)
    return build_teacher(cfg), guidance


@app.command("make-pairs")
def make_pairs(teacher: str = typer.Option(..., help="teacher: gmm, sd, unet2d, or an alias such as sd15"),
               num: int = typer.Option(..., help="number of pairs"),
               out: Path = typer.Option(..., help="output folder"),
               recipe: Optional[Path] = typer.Option(None, help="take the teacher's settings from this recipe"),
               set_: List[str] = typer.Option([], "--set", help="teacher setting, section.key=value"),
               prompts: Optional[str] = typer.Option(None, help="sd: prompts FILE (one a line) or HF_DATASET[:column]"),
               steps: int = typer.Option(50, help="ODE sampler steps"),
               sampler: Optional[str] = typer.Option(None, help="ddim (eta 0), dpmpp-2m, euler or heun (default: "
                                                                "heun for edm and gmm, euler for flow, else ddim)"),
               guidance: Optional[float] = typer.Option(None, help="CFG scale, standard form (default: the "
                                                                  "recipe's or --set teacher.guidance; else sd 3, "
                                                                  "others 1)"),
               seed: int = typer.Option(0), shard_size: int = typer.Option(1024), batch_size: int = typer.Option(256),
               decode: bool = typer.Option(False, "--decode", help="sd: also store decoded images (uint8)"),
               verify: int = typer.Option(0, help="instead of making pairs, check hashes and regenerate N of them")):
    """Teacher ODE (noise, output) pairs for DMD v1's regression loss. Rerun to resume;
    under `accelerate launch` every process makes its own shards of one index space."""
    from .pairs import PairSettings, make_pairs_on_all_ranks, verify_pairs

    if prompts is not None:
        set_ = [*set_, f"teacher.sd.prompts={json.dumps(prompts)}"]
    t, guidance = _teacher_from(teacher, recipe, set_, guidance, {"sd": 3.0})
    if verify:
        import torch

        t.to("cuda" if torch.cuda.is_available() else "cpu")
        _report_problems(verify_pairs(out, t, verify, seed), f"{out}: every shard matches its hash and "
                                                               f"{verify} regenerated pairs match")
        return
    settings = PairSettings(steps, sampler or t.default_sampler, guidance, seed, shard_size, decode)
    manifest = make_pairs_on_all_ranks(t, out, num, settings, batch_size, progress_factory=progress_bar)
    if manifest:
        console.print(f"{sum(s['count'] for s in manifest['shards'])} pairs in {len(manifest['shards'])} shards: "
                      f"{out} ({t.name}, {settings.sampler} {settings.steps} steps, guidance {settings.guidance})")


@app.command("pairs-check")
def pairs_check(folder: Path = typer.Argument(..., help="a folder made by `dmd make-pairs`")):
    """Check that a pairs folder is complete and every shard matches its sha256."""
    from .pairs import verify_pairs

    _report_problems(verify_pairs(folder), f"{folder}: complete, every shard matches its hash")


def _report_problems(problems: list, ok: str) -> None:
    if problems:
        for line in problems[:-1]:
            console.print(f"dmd: {line}", highlight=False)
        raise UserError(problems[-1])
    console.print(ok)


@app.command()
def sample(run: Optional[Path] = typer.Argument(None, help="run or checkpoint folder (omit with --teacher)"),
           num: int = typer.Option(10000, help="number of samples"),
           out: Path = typer.Option(..., help="output folder"),
           teacher: Optional[str] = typer.Option(None, help="sample this teacher alone (gmm, sd, unet2d, sd15)"),
           set_: List[str] = typer.Option([], "--set", help="teacher setting, section.key=value"),
           teacher_steps: int = typer.Option(50, help="teacher ODE steps; with a run, from the same noise (0: skip)"),
           guidance: Optional[float] = typer.Option(None, help="teacher CFG scale, standard form (default: the "
                                                               "run's recipe or --set teacher.guidance, else 1)"),
           sampler: Optional[str] = typer.Option(None, help="teacher sampler: ddim, dpmpp-2m, euler or heun "
                                                            "(default: heun for edm and gmm, euler for flow, "
                                                            "else ddim)"),
           seed: int = typer.Option(0), batch_size: int = typer.Option(256),
           ema: bool = typer.Option(True, "--ema/--no-ema", help="use the generator's EMA weights if the run kept them"),
           images: str = typer.Option("none", help="also write the images: png (one file each) or npz (uint8)"),
           prompts: Optional[str] = typer.Option(None, help="text teachers: these prompts (FILE, one a line, or "
                                                            "HF_DATASET[:column]) instead of the recipe's")):
    """Sample a student (and its teacher, same noise and conditions), or a teacher alone."""
    from .evaluation.samples import SAMPLES_FILE
    from .evaluation.generate import make_samples
    from .runs import load_student
    from .sampling import SAMPLERS

    if num <= 0 or batch_size <= 0:
        raise UserError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    if images not in ("none", "png", "npz"):
        raise UserError(f"--images must be none, png or npz, got {images!r}")
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if (run is None) == (teacher is None):
        raise UserError("give a run folder to sample a student, or --teacher NAME to sample a teacher alone")
    if run is not None:
        recipe, t, generator, step = load_student(run, ema=ema)
        if prompts is not None:
            from .evaluation.generate import use_prompts

            use_prompts(t, prompts)
        sampler = sampler or t.default_sampler
        with progress_bar() as bar:
            results = make_samples(out, num, t, generator=generator, timesteps=recipe.student.timesteps,
                                   precision=recipe.train.mixed_precision,
                                   student_source=f"student {run} step {step}, {len(recipe.student.timesteps)} step(s)",
                                   teacher_steps=teacher_steps, sampler=sampler, seed=seed, batch_size=batch_size,
                                   guidance=recipe.teacher.guidance if guidance is None else guidance, images=images,
                                   progress=bar)
    else:
        if teacher_steps < 1:
            raise UserError("--teacher-steps must be at least 1 when sampling a teacher alone")
        from .utils.processes import process_state

        t, guidance = _teacher_from(teacher, None, set_, guidance, {})
        if prompts is not None:
            from .evaluation.generate import use_prompts

            use_prompts(t, prompts)   # one line for a teacher without prompts
        t.to(process_state().device)
        sampler = sampler or t.default_sampler
        with progress_bar() as bar:
            results = make_samples(out, num, t, teacher_steps=teacher_steps, guidance=guidance, sampler=sampler,
                                   seed=seed, batch_size=batch_size, images=images, progress=bar)
    if not results:   # not the main process under accelerate launch
        return
    for who, (_, rate, steps) in results.items():
        speed = f"{rate:,.1f} samples/s" if rate is not None else "all read back from a stopped call's batches"
        console.print(f"{who}: {num} samples, {steps} step(s), {speed}")
    console.print(f"wrote {out / SAMPLES_FILE} and {out / 'samples.png'}")


@app.command()
def fid(samples: Optional[Path] = typer.Argument(None, help="samples file or folder from `dmd sample`, or its --images npz"),
        from_: Optional[Path] = typer.Option(None, "--from", help="instead: generate the samples on the fly "
                                                                   "from this run or checkpoint, writing no file"),
        num: int = typer.Option(50000, help="with --from: how many samples (classes by global index)"),
        ref: str = typer.Option("gmm", help="gmm (exact mixture), imagenet64, fashion-mnist (shipped, with "
                                            "--features fashion), a clean-fid name, an .npz, a folder of "
                                            "images or a samples file"),
        features: str = typer.Option("inception", help="'inception' (clean-fid's), 'fashion' (our Fashion-MNIST "
                                                        "classifier) or a TorchScript file"),
        mode: str = typer.Option("clean", help="clean-fid mode: clean or legacy_tensorflow"),
        batch_size: int = typer.Option(64),
        json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
        crop: int = typer.Option(0, help="centre-crop and resize samples and reference images to this size "
                                         "first (COCO-30K protocol: 256); 0: off"),
        seed: int = typer.Option(0, help="seed for drawing exact reference samples (gmm)"),
        prompts: Optional[str] = typer.Option(None, help="with --from, text teachers: sample these captions (FILE, "
                                                          "one a line, or HF_DATASET[:column]), e.g. COCO-2014's"),
        clip: Optional[str] = typer.Option(None, help="also the CLIP score of text-to-image samples against their "
                                                       "captions, with this CLIP model (folder or Hub id)")):
    """FID (and KID) of samples against a reference; for the gmm teacher, the Frechet
    distance in its own coordinates with mode metrics. Text-to-image: `--from RUN --prompts
    CAPTIONS --ref REF --crop 256 --clip MODEL` samples the captions and measures, in one command."""
    from .evaluation.samples import gmm_report, load_samples
    from .utils.io import write_json

    if (samples is None) == (from_ is None):
        raise UserError("give a samples file or folder, or --from RUN to generate samples on the fly")
    if prompts is not None and from_ is None:
        raise UserError("--prompts goes with --from RUN (a samples folder keeps the prompts it was made with)")
    from .evaluation.fid import check_reference_features

    check_reference_features(ref, features)
    if from_ is not None:
        from .evaluation.generate import student_tensors

        if num <= 0:
            raise UserError(f"--num must be positive, got {num}")
        from .utils.processes import one_process_only

        one_process_only("fid --from", "run `dmd sample` and then `dmd fid` on its folder")
        with progress_bar() as bar:
            tensors, meta = student_tensors(from_, num, seed=seed, batch_size=max(batch_size, 1), progress=bar,
                                            prompts=prompts)
    else:
        tensors, meta = load_samples(samples)
    desc = json.loads(meta.get("teacher", "{}"))
    if desc.get("name") == "gmm":
        from .evaluation.samples import gmm_rows

        report = gmm_report(tensors["x"], desc, ref, seed)
        title, rows = report["metric"], gmm_rows(report)
    else:
        from .evaluation.fid import fid_report, fid_rows

        if ref == "gmm":
            raise UserError("--ref gmm is for samples of the gmm teacher; give imagenet64, an .npz, a folder "
                            "or a samples file")
        with progress_bar() as bar:
            report = fid_report(tensors, ref, features, mode, batch_size, crop=crop, progress=bar)
        if clip:
            from .evaluation.clip_score import captions_of, clip_score
            from .evaluation.fid import to_uint8_images

            captions = captions_of(tensors, meta)
            with progress_bar() as bar:
                report["clip_score"] = clip_score(to_uint8_images(tensors), captions, clip, batch_size, progress=bar)
            report["clip_model"] = clip
        title = (f"FID, {report['features']} features, {report['mode']} mode"
                 + (f", centre-cropped to {crop}px" if crop else ""))
        rows = fid_rows(report)
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    if json_out:
        write_json(json_out, report)


@app.command()
def compare(runs: List[Path] = typer.Argument(..., help="run or checkpoint folders of one teacher"),
            out: Path = typer.Option(..., help="folder for the samples, compare.json and grid.png"),
            ref: str = typer.Option(..., help="FID reference, as for `dmd fid --ref`"),
            num: int = typer.Option(1000, help="samples per row (classes by global index)"),
            teacher_steps: str = typer.Option("1,4,50", help="teacher step counts, comma-separated"),
            features: str = typer.Option("inception", help="'inception', 'fashion' or a TorchScript file"),
            mode: str = typer.Option("clean"), seed: int = typer.Option(0), batch_size: int = typer.Option(256),
            sampler: Optional[str] = typer.Option(None, help="teacher sampler (default: the teacher's own)"),
            clip: Optional[str] = typer.Option(None, help="text teachers: also the CLIP score, with this CLIP "
                                                           "model (folder or Hub id)")):
    """Students against their teacher at several step counts: FID, KID, class accuracy,
    within-class spread (0: the noise is ignored, mode collapse) and images per second on the
    same noise and conditions, plus a grid of each student over the teacher. Several runs of
    one teacher share its rows. Rerunning resumes: rows whose settings and weights are
    unchanged are read back from OUT, not sampled again."""
    from .evaluation.compare import compare as run_compare, rows_for_table, speedup

    try:
        steps = [int(s) for s in teacher_steps.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--teacher-steps must be comma-separated integers, got {teacher_steps!r}") from None
    with progress_bar() as bar:
        rows = run_compare(runs, out, num, steps, ref, features, mode, seed, batch_size, sampler, progress=bar,
                           clip=clip)
    table = Table(title=f"{rows[0]['num_samples']} samples a row, {rows[0]['features']} features, "
                        f"reference {rows[0]['reference']}")
    for column in ("sampler", "FID", "KID", "class accuracy", "spread", *(["CLIP score"] if clip else []), "images/s"):
        table.add_column(column, justify="left" if column == "sampler" else "right")
    for row in rows_for_table(rows):
        table.add_row(*row)
    Console().print(table)
    for note in dict.fromkeys(note for r in rows for note in r.get("notes", [])):   # each once
        console.print(f"note: {note}", highlight=False)
    if any(r["resumed"] for r in rows):
        console.print(f"* sampled by an earlier call with the same settings and weights (read back from {out}): "
                      "its images/s come from that call")
    ratio = speedup(rows)
    if ratio is not None:
        console.print(f"student is {ratio:,.1f}x the teacher's images per second at {max(steps)} steps")
    console.print(f"wrote {out / 'compare.json'} and {out / 'grid.png'} (teacher below the students, same noise)")


@app.command("fid-ref")
def fid_ref(source: str = typer.Argument(..., help="folder of images, samples file, or dataset "
                                                     "(fashion-mnist, imagefolder:PATH, a Hub dataset)"),
            out: Path = typer.Option(..., help="statistics file to write (.npz)"),
            features: str = typer.Option("inception", help="'inception', 'fashion' or a TorchScript file"),
            mode: str = typer.Option("clean"), split: str = typer.Option("test", help="dataset split"),
            size: int = typer.Option(0, help="dataset images at this size, as the students make them "
                                               "(fashion-mnist: 32, padded); 0: as stored"),
            batch_size: int = typer.Option(64),
            crop: int = typer.Option(0, help="centre-crop and resize images to this size first "
                                             "(COCO-30K protocol: 256); 0: off")):
    """Reference statistics (mu, sigma) for `dmd fid --ref FILE`, kept where you say."""
    from .evaluation.fid import make_reference

    with progress_bar() as bar:
        info = make_reference(source, out, features, mode, batch_size, split, size, crop, progress=bar)
    console.print(f"wrote {out}: {info['count']} images, {info['dim']}-d features ({features}, {mode})")


@app.command()
def export(run: Path = typer.Argument(..., help="run or checkpoint folder"),
           out: Path = typer.Option(..., help="output folder (a diffusers folder)"),
           fid: str = typer.Option("not measured", help="FID to state in the model card, e.g. '12.3 (clean, 30K)'"),
           float16: bool = typer.Option(False, "--float16", help="write the weights in half precision (half the size)")):
    """Write a student as a diffusers folder (SD: a StableDiffusionPipeline with LCMScheduler;
    EDM: a dmd-edm/1 folder, said in one line, that `dmd sample` and `dmd compare` also read)."""
    from .export import export as run_export

    folder, note = run_export(run, out, fid, float16)
    if note:
        console.print(f"note: {note}", highlight=False)
    console.print(f"exported {run} to {folder} (see its README.md)")


def main(argv: Optional[list] = None) -> int:
    """Entry point; returns the exit code (2 for user mistakes, with one line on stderr)."""
    try:
        app(args=argv, prog_name="dmd", standalone_mode=False)
    except UserError as e:
        console.print(Text("dmd: error: ", style="red") + Text(str(e)), soft_wrap=True, highlight=False)
        return 2
    except Stopped as e:
        console.print(f"dmd: {e}", soft_wrap=True, highlight=False)
        return 128 + e.signum
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise
        console.print(Text("dmd: error: ", style="red") + Text(f"cannot write {e.filename or 'a file'}: "
                      f"{e.strerror}; free space or choose another output folder (nothing half-written is kept)"),
                      soft_wrap=True, highlight=False)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except click_exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except typer.Abort:
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
