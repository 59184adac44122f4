"""The ``sslt`` command line: parses, calls, prints. The only Typer module.

Heavy libraries (torch, mlflow, cv2, av) are imported inside the commands so ``sslt --help`` is instant.
Results go to stdout; progress and diagnostics to stderr.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from contextlib import ExitStack
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from sslt_cli import PROTOCOL_NAMES
from sslt_cli.data.difficulty import KNOB_HELP
from sslt_cli.errors import SsltError
from sslt_cli.preflight import readable_file, writable_dir

# the model families of sslt_cli/families (named here so `sslt --help` needs no torch; a test keeps them equal)
FAMILY_CHOICES = ("ssltie", "lvs", "ssl_align", "ezvsl", "fnac", "slavc")
FAMILY_HELP = (f"Model family of a released checkpoint: {', '.join(FAMILY_CHOICES)} (default: recognised from its "
               "keys).")
BRANCH_HELP = "SLAVC's branch: online (its test code's) or momentum (use_mom_eval)."
FRONT_END_CHOICES = ("lvs", "ezvsl", "align_lvs", "align_ezvsl")
FRONT_END_HELP = ("A released model's audio front end other than its own: align_lvs (SSLalignment's 3.5-6.5 s slice, "
                  "LVS models), align_ezvsl (SSLalignment's rolled first 10 s, EZ-VSL / FNAC / SLAVC), lvs, ezvsl.")

out = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="sslt",
    help="Self-supervised visual sound-source localisation: prepare data, train SSL-TIE and baselines, evaluate "
         "under every published protocol, retrieve, ablate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    epilog="Example: sslt prepare synthetic --out data/synthetic && sslt train quickstart",
)
prepare_app = typer.Typer(
    help="Prepare data sets in the layouts train/eval read (writes a manifest; never crawls at train time).",
    no_args_is_help=True,
    epilog="Example: sslt prepare synthetic --out data/synthetic",
)
app.add_typer(prepare_app, name="prepare")
data_app = typer.Typer(
    help="The public benchmark metadata shipped with sslt (test lists, VGG-SS boxes), usable by short name.",
    no_args_is_help=True,
    epilog="Example: sslt data list",
)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from sslt_cli import __version__

        typer.echo(f"sslt {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """The options of ``sslt`` itself (before any command)."""


def _example(text: str) -> str:
    return f"Example: {text}"


# ---------------------------------------------------------------------------------------------------------- prepare

@prepare_app.command("synthetic", epilog=_example("sslt prepare synthetic --out data/synthetic --train 5000 --seed 0"))
def prepare_synthetic(
    out_dir: Path = typer.Option(..., "--out", help="Output folder (created)."),
    n_train: int = typer.Option(5000, "--train", min=1, help="Training clips."),
    n_val: int = typer.Option(200, "--val", min=1, help="Validation clips (with boxes; never the test set)."),
    n_test: int = typer.Option(500, "--test", min=1, help="VGG-SS-style test clips."),
    n_flickr: int = typer.Option(250, "--flickr", min=1, help="Flickr-style test clips."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
    image_size: int = typer.Option(128, "--image-size", min=32, help="Frame size in pixels (square; Flickr-style frames are at least 256)."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=16000, max=48000, help="Audio sample rate (Hz; the sounds reach 7 kHz)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: CPU count, at most 4)."),
    force: bool = typer.Option(False, help="Regenerate into a folder made with other parameters."),
    preset: str = typer.Option("easy", help="Difficulty preset: easy (the embedded benchmark) or hard (every knob "
                                            "below on, like real video); the knobs override it."),
    objects: Optional[str] = typer.Option(None, help=KNOB_HELP["objects"]),
    area: Optional[str] = typer.Option(None, help=KNOB_HELP["area"]),
    background: Optional[str] = typer.Option(None, help=KNOB_HELP["background"]),
    same_shape: Optional[float] = typer.Option(None, "--same-shape", help=KNOB_HELP["same_shape"]),
    offscreen: Optional[float] = typer.Option(None, help=KNOB_HELP["offscreen"]),
    offscreen_db: Optional[str] = typer.Option(None, "--offscreen-db", help=KNOB_HELP["offscreen_db"]),
    snr_db: Optional[str] = typer.Option(None, "--snr-db", help=KNOB_HELP["snr_db"]),
    camera: Optional[float] = typer.Option(None, help=KNOB_HELP["camera"]),
) -> None:
    """Generate the embedded synthetic benchmark in the real layouts (train, val, VGG-SS-style and Flickr-style test);
    --preset hard and the difficulty knobs make it look like real video (scenes.csv records what each clip drew)."""
    from sslt_cli.data.difficulty import parse_difficulty
    from sslt_cli.data.synthetic import generate

    writable_dir(out_dir, "--out")
    knobs = {"objects": objects, "area": area, "background": background, "same_shape": same_shape,
             "offscreen": offscreen, "offscreen_db": offscreen_db, "snr_db": snr_db, "camera": camera}
    difficulty = parse_difficulty(preset, {k: v for k, v in knobs.items() if v is not None}, where="--preset/knobs")
    summary = generate(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, n_flickr=n_flickr, seed=seed,
                       image_size=image_size, sample_rate=sample_rate, workers=workers, force=force, progress=True,
                       difficulty=difficulty)
    _print_mapping("synthetic benchmark", summary)


@prepare_app.command("vggsound", epilog=_example(
    "sslt prepare vggsound --videos ~/vggsound/video --out data/vggsound/train --split train --workers 8"))
def prepare_vggsound(
    videos: Path = typer.Option(..., "--videos", help="Folder of VGGSound clips (<ytid>_<start>.mp4 or <ytid>_<start>_<end>.mp4)."),
    out_dir: Path = typer.Option(..., "--out", help="Output set folder."),
    split: str = typer.Option("train", help="train (frame 125 + 3 s audio) or test (VGG-SS layout, 10 s audio, boxes)."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids to prepare: a list file or a built-in name (ssltie-vggss-4911; sslt data list); missing videos are reported."),
    vggss_json: Optional[Path] = typer.Option(None, "--vggss-json", help="VGG-SS boxes for --split test (anno/<id>.xml): vggss.json, or vggss for the built-in copy."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="vggsound.csv (ytid,start,label,split) for the label column."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=4000, help="Output audio rate (mono)."),
    neighbours: int = typer.Option(0, min=0, help="Also write this many frames either side of frame 125."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: CPU count)."),
) -> None:
    """Prepare VGGSound clips: frame 125 (t = 5 s) as JPEG and the audio window, with a manifest; resumable."""
    from sslt_cli.data.prepare import prepare_vggsound as run

    writable_dir(out_dir, "--out")
    _check_inputs((id_list, "--list", "list"), (vggss_json, "--vggss-json", "boxes"), (labels, "--labels", "labels"))
    if split not in ("train", "test"):
        raise SsltError(f"--split must be train or test, got {split!r}")
    _print_prepare(run(videos, out_dir, split=split, id_list=id_list, vggss_json=vggss_json, labels=labels,
                       sample_rate=sample_rate, neighbours=neighbours, workers=workers, progress=True))


@prepare_app.command("flickr", epilog=_example(
    "sslt prepare flickr --archive ~/Flickr-SoundNet --out data/flickr/test_flickr --split test "
    "--list flickr-249"))
def prepare_flickr(
    archive: Path = typer.Option(..., "--archive", help="The Flickr-SoundNet download (Annotations/ + Data/)."),
    out_dir: Path = typer.Option(..., "--out", help="Output set folder."),
    split: str = typer.Option("test", help="test (frames, audio, 3-annotator boxes) or train."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids to prepare: a list file or a built-in name (flickr-249, slavc-flickr-250)."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=4000, help="Output audio rate (mono)."),
    seconds: Optional[float] = typer.Option(None, help="Audio seconds kept (default: 10 for test, 4 for train)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes."),
) -> None:
    """Prepare the Flickr-SoundNet test set (or training pairs) from the downloaded archive, with a manifest."""
    from sslt_cli.data.prepare import prepare_flickr as run

    writable_dir(out_dir, "--out")
    _check_inputs((id_list, "--list", "list"))
    if split not in ("train", "test"):
        raise SsltError(f"--split must be train or test, got {split!r}")
    _print_prepare(run(archive, out_dir, split=split, id_list=id_list, sample_rate=sample_rate, seconds=seconds,
                       workers=workers, progress=True))


@prepare_app.command("vggss-annotations", epilog=_example(
    "sslt prepare vggss-annotations --json vggss --out data/vggss/anno"))
def prepare_vggss_annotations(
    json_path: Optional[Path] = typer.Option(None, "--json", help="vggss.json to convert into per-clip XML (vggss: the built-in copy)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for <id>.xml files."),
    from_xml: Optional[Path] = typer.Option(None, "--from-xml", help="The reverse: a folder of <id>.xml ..."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="... collected into this vggss.json."),
) -> None:
    """Convert VGG-SS boxes between the public JSON and SSL-TIE's per-clip XML; defects are reported."""
    from sslt_cli.data.prepare import collect_vggss_json, prepare_vggss_annotations as run

    if json_path and out_dir:
        report = run(json_path, out_dir)
    elif from_xml and json_out:
        report = collect_vggss_json(from_xml, json_out)
    else:
        raise SsltError("give --json FILE --out DIR (JSON -> XML) or --from-xml DIR --json-out FILE (XML -> JSON)")
    _print_mapping("VGG-SS annotations", {"written to": str(report.path), "clips": report.clips, "boxes": report.boxes,
                                          "files written": report.written, "files unchanged": report.unchanged})
    for line in report.defects.summary():
        err.print(f"defect: {line}", highlight=False)


@prepare_app.command("is3", epilog=_example("sslt prepare is3 ~/IS3 --out data/is3 && sslt eval RUN --data data/is3"))
def prepare_is3(
    root: Path = typer.Argument(..., help="IS3 as released: images/, audio_wav/, IS3_annotation.json, "
                                          "gt_segmentation/."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the prepared set (default: ROOT itself); the "
                                       "media are read where they are."),
    gt: str = typer.Option("boxes", "--gt", help="boxes (the annotation's boxes) or masks (gt_segmentation/)."),
) -> None:
    """Read the IS3 benchmark (two-object images, one sample per object) into a prepared set: boxes or masks as the
    ground truth, each sample's category as its label, both objects' classes on screen (scenes.csv)."""
    from sslt_cli.data.is3 import prepare_is3 as read_is3

    target = out or root
    writable_dir(target, "--out" if out else "ROOT", why="sslt prepare is3 writes the set's manifest.csv there")
    _print_prepare(read_is3(root, out, gt=gt), indexed=True)


@prepare_app.command("index", epilog=_example(
    "sslt prepare index ~/vggss_test --layout vggss_test --list ssltie-vggss-4911"))
def prepare_index(
    root: Path = typer.Argument(..., help="A folder already in one of the layouts (made by other tools)."),
    layout: str = typer.Option(..., help="vggsound_train | vggss_test | flickr_test | flickr_train."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids expected: a list file or a built-in name (default: every clip found)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="vggsound.csv or id,label CSV."),
    workers: Optional[int] = typer.Option(None, min=1, help="Threads checking clips (default: 2 per CPU)."),
) -> None:
    """Write the manifest for a folder laid out by other tools: each clip's frame and audio headers are read and its
    boxes parsed; every incomplete clip is listed with its reason."""
    from sslt_cli.data.prepare import index_existing

    writable_dir(root, "ROOT", why="sslt prepare index writes the set's manifest.csv into ROOT")
    _check_inputs((id_list, "--list", "list"), (labels, "--labels", "labels"))
    _print_prepare(index_existing(root, layout, id_list, labels=labels, workers=workers), indexed=True)


# ------------------------------------------------------------------------------------------------------------- data

@data_app.command("list", epilog=_example("sslt data list && sslt eval --baselines-only --vggss-json vggss "
                                          "--list ssltie-vggss-4911"))
def data_list() -> None:
    """The built-in files (short name, kind, records, source, licence) and the shipped recipes.

    A short name works wherever sslt takes a path of that kind (--list, --vggss-json, --labels, --extended, recipe
    data.labels); a file of yours with the same name, where it exists, wins.
    """
    from rich.table import Table

    from sslt_cli import catalog

    table = Table(title="built-in data files (sslt_cli/resources; sources, commits, licences: NOTICE there)")
    table.add_column("name", no_wrap=True, min_width=max(len(entry.name) for entry in catalog.BUILTINS))
    table.add_column("kind")
    table.add_column("records", justify="right")
    for col in ("what", "source", "licence"):
        table.add_column(col)
    for entry in catalog.BUILTINS:
        kinds = ", ".join(catalog.KIND_WORDS[k] for k in entry.kinds)
        table.add_row(entry.name, kinds, _count_records(entry), entry.what, entry.source, entry.licence)
    out.print(table)
    recipes = Table(title="shipped recipes (sslt train NAME; sslt ablate NAME base=NAME)")
    recipes.add_column("kind")
    recipes.add_column("names")
    recipes.add_row("recipes", ", ".join(catalog.builtin_recipes(catalog.RECIPES_DIR)))
    recipes.add_row("ablations", ", ".join(catalog.builtin_recipes(catalog.RECIPES_DIR / "ablations")))
    out.print(recipes)
    err.print(f"files: {catalog.RESOURCES_DIR}")


def _count_records(entry) -> str:
    """What a built-in file holds, counted by the reader sslt uses for its kind."""
    import json

    if "boxes" in entry.kinds:
        records = json.loads(entry.path.read_text())
        classes = {r.get("class") for r in records}
        return f"{len(records)} clips ({sum(len(r['bbox']) for r in records)} boxes, {len(classes)} classes)"
    if "pairs" in entry.kinds:
        from sslt_cli.evaluate import read_silent_pairs

        return f"{len(read_silent_pairs(entry.path))} pairs"
    from sslt_cli.data.annotations import read_id_list

    return f"{len(read_id_list(entry.path))} clips"


# ------------------------------------------------------------------------------------------------------------ train

@app.command(epilog=_example("sslt train quickstart optim.epochs=2 --dry-run"))
def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML file, or the name of a shipped recipe "
                                           "(quickstart, tie_full, ...; sslt data list); not with --resume."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=3e-4."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the run folder; do nothing."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train in N processes on this machine through "
                                        "torchrun (one per GPU); optim.batch_size is the global batch."),
) -> None:
    """Train SSL-TIE (or a baseline) from a recipe; writes a run folder and mirrors it to MLflow."""
    from sslt_cli.config import dump_yaml, load_recipe, recipe_dict

    overrides = list(overrides or [])
    if nproc is not None and not dry_run:
        from sslt_cli.distributed import launch_torchrun

        if resume is not None:
            raise typer.Exit(launch_torchrun(nproc, ["train", "--resume", str(resume)]))
        if recipe is None:
            raise SsltError("give a recipe file (e.g. recipes/tie_full.yaml), or --resume RUN_DIR")
        load_recipe(recipe, overrides)  # every recipe problem is reported here, once, not by N processes
        raise typer.Exit(launch_torchrun(nproc, ["train", str(recipe), *overrides]))
    if resume is not None:
        from sslt_cli.runs import Run

        run = Run.open(resume)
        if recipe is not None and recipe.suffix not in (".yaml", ".yml") and "=" in str(recipe):
            overrides.insert(0, str(recipe))
        elif recipe is not None:
            raise SsltError(f"--resume continues {run.dir} with the recipe saved in it; a recipe file is not allowed",
                            [f"got {recipe}: drop it to resume, or start a new run with `sslt train {recipe}`"])
        if overrides:
            raise SsltError("--resume continues a run with its saved recipe; overrides are not allowed",
                            [f"got {' '.join(overrides)}; start a new run to change the recipe"])
        if dry_run:
            typer.echo(dump_yaml(recipe_dict(run.recipe())), nl=False)
            typer.echo(f"would resume {run.dir}", err=True)
            return
        _run_training(run.recipe(), lambda world: run, resume=True)
        return
    if recipe is None:
        raise SsltError("give a recipe file (e.g. recipes/quickstart.yaml), or --resume RUN_DIR")
    resolved = load_recipe(recipe, overrides)
    if dry_run:
        typer.echo(dump_yaml(recipe_dict(resolved)), nl=False)
        typer.echo(f"would create a run folder under {Path(resolved.runs_dir) / (resolved.name + '-<timestamp>')}", err=True)
        return
    from sslt_cli.runs import Run

    _run_training(resolved, lambda world: Run.create(resolved, overrides=overrides,
                                                     extra_meta={"recipe_path": str(recipe), "world_size": world}),
                  resume=False)


def _run_training(recipe, make_run, resume: bool) -> None:
    """Train (:func:`sslt_cli.train.train`) into the run ``make_run(world size)`` gives: under torchrun rank 0 makes
    it and every rank gets it. What must stop a run before its folder exists is checked first, once
    (:func:`sslt_cli.train.preflight`). The folder's MLflow run is opened here (rank 0; the other ranks get a null
    sink) and closed with the training's status. A training stopped by SIGTERM/SIGINT exits 130, so a scheduler
    sees that it did not finish (its checkpoint and the resume hint are written by then). SIGINT / SIGTERM are
    heard from the start (:mod:`sslt_cli.interrupts`), so a stop in any phase (set-up, steps, validation, the final
    evaluation) ends the same way, with the command that continues the run. Rank 0 holds the run folder
    (:func:`sslt_cli.folder_lock.hold`) while it trains: a second process on the folder is refused."""
    from sslt_cli import distributed, interrupts
    from sslt_cli.tracking import run_tracking
    from sslt_cli.train import preflight, train as run_training

    with interrupts.listening(), ExitStack() as held:
        env = distributed.init_distributed(distributed.device_kind(recipe.train.device))
        if resume and env.main:  # an existing folder: held before the checks, so a second process stops at once
            held.enter_context(_held(make_run(env.world).dir, "run folder"))
            make_run(env.world).check_resumable()
        preflight(recipe, env, distributed.pick_device(recipe.train.device, env.local_rank))
        run = distributed.share_run(env, lambda: make_run(env.world))
        if not resume:
            held.enter_context(_held(run.dir, "run folder", env.main))
        with run_tracking(run, recipe, main=env.main) as sink:
            result = run_training(recipe, run, sink=sink, resume=resume, console=err, out=out)
            sink.end("FINISHED" if result.status == "finished" else "KILLED")
    if result.status == "interrupted":
        err.print(f"not finished: {result.continue_with or run.resume_hint()}", highlight=False)
        raise typer.Exit(interrupts.EXIT_CODE)


# ------------------------------------------------------------------------------------------------------------- eval

@app.command("eval", epilog=_example(
    "sslt eval --baselines-only --vggss-json vggss --list ssltie-vggss-4911"))
def eval_cmd(
    target: Optional[Path] = typer.Argument(None, help="Run folder, or checkpoint file (sslt, or a released model: "
                                            "SSL-TIE, LVS, SSL-Align, EZ-VSL, FNAC, SLAVC)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Prepared test set folder(s) (vggss_test or "
                                              "flickr_test layout). Default: the run recipe's data.test sets."),
    vggss_json: Optional[Path] = typer.Option(None, "--vggss-json", help="Take VGG-SS boxes from the public JSON (vggss: the built-in copy)."),
    media: Optional[Path] = typer.Option(None, "--media", help="With --vggss-json: folder with frame/ and audio/."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Evaluate a published subset: a list file or a built-in name (ssltie-vggss-4911, vggss-5158, flickr-249, ...; sslt data list)."),
    protocol: Optional[str] = typer.Option(None, help=f"One of {', '.join(PROTOCOL_NAMES)} (default: the recipe's, "
                                                      "else ssltie)."),
    maps: Optional[Path] = typer.Option(None, "--maps", help="Score precomputed maps: a folder of <id>.npy or an .npz."),
    baselines_only: bool = typer.Option(False, "--baselines-only", help="Only the baselines and the oracle ceiling."),
    extended: Optional[Path] = typer.Option(None, "--extended", help="SLAVC *_plus_silent.csv (built-in: slavc-vggss-plus-silent, slavc-flickr-plus-silent): AP and max-F1 with "
                                            "non-sounding pairs."),
    silent_data: Optional[Path] = typer.Option(None, "--silent-data", help="With --extended: the prepared set holding "
                                               "the non-sounding pairs' frames and audio (default: the test set)."),
    silent_maps: Optional[Path] = typer.Option(None, "--silent-maps", help="With --extended and --maps: maps of the "
                                               "non-sounding pairs keyed '<video>+<audio>'."),
    which: str = typer.Option("both", help="For a run folder: best, last or both checkpoints."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run's eval/, else "
                                           "./eval/<set>-<protocol>)."),
    no_clip: bool = typer.Option(False, "--no-clip", help="SSL-TIE's literal unclipped VGG-SS boxes."),
    constant_maps: Optional[str] = typer.Option(None, "--constant-maps", help="whole_frame (a map constant before "
                                                "upsampling predicts the whole frame) or official (the preset's "
                                                "code: value-dependent). Default: the recipe's, else whole_frame."),
    empty_gt: Optional[str] = typer.Option(None, "--empty-gt", help="exclude (a clip whose ground truth is empty, "
                                           "e.g. after clipping, is listed, not scored) or zero (scored 0 and counted "
                                           "in N, as the official code). Default: the recipe's, else exclude."),
    ogl_weights: Optional[Path] = typer.Option(None, "--ogl-weights", help="EZ-VSL's object-guided localisation: a "
                                               "local torchvision resnet18 state_dict (ImageNet weights); the maps "
                                               "scored are alpha * AV + (1 - alpha) * object map. Default: the "
                                               "recipe's eval.ogl_weights (off)."),
    ogl_alpha: Optional[float] = typer.Option(None, "--ogl-alpha", min=0.0, max=1.0, help="With object guidance: the "
                                              "weight of the audio-visual map (default: the recipe's, else 0.4)."),
    negatives: Optional[str] = typer.Option(None, "--negatives", help="Negative audio: silence,noise,offscreen (and "
                                            "optionally a SLAVC non-sounding list by name); README 'Negative audio'."),
    draws: int = typer.Option(1, "--draws", min=1, help="With --negatives: draws of noise and off-screen audio."),
    noise_level: float = typer.Option(1.0, "--noise-level", help="With --negatives: the noise's std (1.0)."),
    noise_colour: str = typer.Option("white", "--noise-colour", help="With --negatives: white or pink noise."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="With --negatives offscreen: a clip label file."),
    threshold: float = typer.Option(0.5, "--threshold", help="With --negatives: the universal threshold (0.5)."),
    negatives_val: Optional[Path] = typer.Option(None, "--negatives-val", help="With --negatives: the set the "
                                                 "per-model threshold is chosen on (default: the recipe's data.val)."),
    negative_maps: Optional[Path] = typer.Option(None, "--negative-maps", help="With --negatives and --maps: maps "
                                                 "keyed <clip id>@<kind>@<draw>."),
    seed: int = typer.Option(0, "--seed", help="With --negatives: the seed of the noise and off-screen draws."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Clips per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
    branch: Optional[str] = typer.Option(None, "--branch", help=BRANCH_HELP),
    front_end: Optional[str] = typer.Option(None, "--front-end", help=FRONT_END_HELP),
) -> None:
    """Evaluate a model (or precomputed maps, or only baselines) under a published protocol, with N and baselines."""
    from sslt_cli import evaluate as ev
    from sslt_cli.progress import ClipProgress
    from sslt_cli.runs import Run

    _check_eval_options(target=target, maps=maps, baselines_only=baselines_only, extended=extended,
                        silent_maps=silent_maps, silent_data=silent_data, vggss_json=vggss_json, media=media,
                        protocol=protocol, which=which, ogl=ogl_weights is not None or ogl_alpha is not None)
    if out_dir is not None:
        writable_dir(out_dir, "--out")
    _check_family(family, branch, target, front_end)
    _check_inputs((vggss_json, "--vggss-json", "boxes"), (id_list, "--list", "list"), (extended, "--extended", "pairs"),
                  (ogl_weights, "--ogl-weights", None))
    recipe, sources, run_dir = _eval_sources(target, which, maps, (family, branch, front_end))
    where = out_dir or (run_dir / "eval" if run_dir is not None else Path("eval"))
    _check_outputs(where, run_dir, "sslt eval")
    options = _eval_options(recipe, protocol=protocol, constant_maps=constant_maps, empty_gt=empty_gt,
                            no_clip=no_clip, ogl=(ogl_weights, ogl_alpha), batch_size=batch_size, device=device,
                            extended=(extended, silent_data, silent_maps))
    options = _with_negatives(options, recipe, negatives, target=target, maps=maps, baselines_only=baselines_only,
                              extended=extended, settings=(draws, noise_level, noise_colour, seed),
                              labels=labels, threshold=threshold, validation=negatives_val,
                              negative_maps=negative_maps)
    tests = _eval_sets(recipe, data, vggss_json, media, id_list)
    run = Run.open(run_dir) if run_dir is not None else None
    with _tracking(run, recipe, f"eval-{target.stem if target is not None else 'maps'}",
                   params={"eval.protocol": options.protocol_for(getattr(recipe, "eval", None)).name}) as sink:
        evaluation = ev.run_evaluation(sources, tests, options, sink, out=where, kind="eval",
                                       exact_folder=target is None and out_dir is not None,
                                       progress=lambda what, total: ClipProgress(err, what, total))
    ev.print_evaluation(evaluation, out, err, title=lambda item: f"{item.result.name}: {item.described} · protocol "
                                                                  f"{item.protocol} · N = {item.result.n}")


def _check_family(family: str | None, branch: str | None, target: Path | None, front_end: str | None = None) -> None:
    if family is not None and family not in FAMILY_CHOICES:
        raise SsltError(f"--family {family!r} is not one of {', '.join(FAMILY_CHOICES)}")
    if front_end is not None and front_end not in FRONT_END_CHOICES:
        raise SsltError(f"--front-end {front_end!r} is not one of {', '.join(FRONT_END_CHOICES)}")
    if branch is not None and branch not in ("online", "momentum"):
        raise SsltError(f"--branch {branch!r}: choose online or momentum (SLAVC)")
    if (family is not None or branch is not None or front_end is not None) and target is None:
        raise SsltError("--family / --branch / --front-end describe a checkpoint: give one (they do not apply to "
                        "--maps or --baselines-only)")


def _eval_sources(target: Path | None, which: str, maps: Path | None, model: tuple = (None, None, None)):
    """(the run's recipe or None, what `sslt eval` scores, the run folder or None): the checkpoints of a run folder
    or a checkpoint file (``model``: its family, else recognised from its keys, SLAVC's branch, another front end),
    else precomputed maps, else only the baselines."""
    from sslt_cli import checkpoint
    from sslt_cli import evaluate as ev

    if target is None:
        scored = ev.Source.precomputed(ev.load_maps(maps), maps) if maps is not None else ev.Source.baselines()
        return None, [scored], None
    recipe, checkpoints, run_dir = checkpoint.resolve_checkpoints(target, which)
    if recipe is None and run_dir is not None:
        from sslt_cli.runs import Run

        recipe = Run.open(run_dir).recipe()  # a checkpoint file inside a run folder: the run's recipe
    family, branch, front_end = model
    return recipe, [ev.Source.checkpoint_file(label, path, recipe, run_dir, family=family, branch=branch,
                                              front_end=front_end) for label, path in checkpoints], run_dir


def _eval_options(recipe, *, protocol, constant_maps, empty_gt, no_clip, ogl, batch_size, device, extended):
    """`sslt eval`'s options as one :class:`EvalOptions` (None: the recipe's), checked before any work: the protocol
    and its deviation options; ``extended``: (--extended, --silent-data, --silent-maps)."""
    from sslt_cli import evaluate as ev
    from sslt_cli.distributed import pick_device

    pairs_file, silent_data, silent_maps = extended
    options = ev.EvalOptions(protocol=protocol, constant_maps=constant_maps, empty_gt=empty_gt,
                             clip_boxes=False if no_clip else None,
                             ogl_weights=str(ogl[0]) if ogl[0] is not None else None, ogl_alpha=ogl[1],
                             batch_size=batch_size, device=str(pick_device(device, option="--device")))
    options.protocol_for(recipe.eval if recipe is not None else None)
    if pairs_file is None:
        return options
    return dataclasses.replace(options, extended=ev.ExtendedPairs(
        tuple(ev.read_silent_pairs(pairs_file)), media=ev.load_test_set(silent_data) if silent_data else None,
        maps=ev.load_maps(silent_maps) if silent_maps else None, maps_source=str(silent_maps or "")))


def _with_negatives(options, recipe, negatives, *, target, maps, baselines_only, extended, settings, labels,
                    threshold, validation, negative_maps):
    """``options`` with the negative-audio evaluation of ``--negatives`` (kinds, and a SLAVC list by name: the
    extended evaluation; default: the run recipe's ``eval.negatives``), checked before any work; the per-model
    threshold's set defaults to the recipe's data.val."""
    from sslt_cli import evaluate as ev
    from sslt_cli.data.annotations import read_labels
    from sslt_cli.data.negatives import NEGATIVE_TYPES, NegativeSettings

    if negatives is None and target is not None and recipe is not None and recipe.eval.negatives:
        negatives = ",".join(recipe.eval.negatives)  # the run's recipe asks for them (eval.negatives)
    if negatives is None:
        if negative_maps is not None or validation is not None or labels is not None:
            raise SsltError("--negative-maps, --negatives-val and --labels go with --negatives KINDS")
        return options
    entries = [e.strip() for e in negatives.split(",") if e.strip()]
    kinds = tuple(k for k in NEGATIVE_TYPES if k in entries)
    lists = [e for e in entries if e not in NEGATIVE_TYPES]
    if baselines_only:
        raise SsltError("--negatives does not go with --baselines-only: negative audio needs a model or its maps")
    if len(lists) > 1 or (lists and extended is not None):
        raise SsltError("give one SLAVC non-sounding list, in --negatives or --extended, not both")
    if lists:
        options = dataclasses.replace(options, extended=ev.ExtendedPairs(tuple(ev.read_silent_pairs(lists[0]))))
    if not kinds:
        return options
    if maps is not None and negative_maps is None:
        raise SsltError("--negatives with --maps needs the negative maps too: give --negative-maps FILE_OR_DIR, maps "
                        "keyed <clip id>@<kind>@<draw> (e.g. clip1@silence@0, clip1@noise@0)")
    draws, level, colour, seed = settings
    if validation is None and recipe is not None and target is not None and recipe.data.val:
        from sslt_cli.data.manifest import read_set

        default = recipe.data.set_path(recipe.data.val)
        validation = default if (default / "set.json").is_file() and read_set(default).anno_kind else None
    val_set = ev.load_test_set(validation) if validation is not None and target is not None else None
    return dataclasses.replace(options, negatives=ev.NegativeOptions(
        NegativeSettings(kinds, draws=draws, noise_level=level, noise_colour=colour, seed=seed),
        labels=read_labels(labels) if labels is not None else None, threshold=threshold, validation=val_set,
        maps=ev.load_maps(negative_maps) if negative_maps is not None else None, maps_source=str(negative_maps or "")))


def _check_eval_options(*, target, maps, baselines_only, extended, silent_maps, silent_data, vggss_json, media,
                        protocol, which, ogl) -> None:
    """`sslt eval`'s option combinations that cannot work, each refused with what to do instead."""
    if protocol is not None and protocol not in PROTOCOL_NAMES:
        raise SsltError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOL_NAMES)}")
    if which not in ("best", "last", "both"):
        raise SsltError(f"--which must be best, last or both, got {which!r}")
    modes = sum(x for x in (target is not None, maps is not None, baselines_only))
    if modes != 1:
        raise SsltError("give exactly one of: a run folder or checkpoint, --maps FILE_OR_DIR, or --baselines-only")
    if extended is not None and baselines_only:
        raise SsltError("--extended does not go with --baselines-only: the extended evaluation ranks pairs by the "
                        "confidence of their maps, and the baselines have no confidence scores",
                        ["score a model (RUN or CHECKPOINT) or --maps with --silent-maps, or drop --extended"])
    if extended is not None and maps is not None and silent_maps is None:
        raise SsltError("--extended with --maps needs --silent-maps: the maps of the non-sounding pairs, keyed "
                        "'<video>+<audio>' (a folder of .npy files or one .npz)")
    if silent_maps is not None and (extended is None or maps is None):
        raise SsltError("--silent-maps goes with --maps and --extended (SLAVC's *_plus_silent.csv); add both, or "
                        "drop --silent-maps")
    if silent_data is not None and (extended is None or target is None):
        raise SsltError("--silent-data goes with a model (RUN or CHECKPOINT) and --extended; with --maps, give the "
                        "non-sounding pairs' maps with --silent-maps")
    if ogl and target is None:
        raise SsltError("--ogl-weights / --ogl-alpha go with a model (RUN or CHECKPOINT): object-guided localisation "
                        "runs an ImageNet ResNet-18 on the frames, which precomputed maps and baselines do not have")
    if target is not None and vggss_json is not None and media is None:
        raise SsltError(f"--vggss-json {vggss_json} holds boxes only: running a model on them needs the frames and "
                        f"audio too",
                        ["pass --media DIR, a folder with frame/<id>.jpg and audio/<id>.wav (the vggss_test layout), "
                         "or score precomputed maps (--maps) or only the baselines (--baselines-only)"])


def _eval_sets(recipe, data, vggss_json, media, id_list) -> list:
    """[(set name for output folders, test set)]: --vggss-json, --data folders, else the recipe's test sets; their
    notes (box defects, ...) said on stderr."""
    from sslt_cli import evaluate as ev

    tests = []
    if vggss_json is not None:
        loaded_json = ev.load_vggss_json_set(vggss_json, id_list, media)
        tests.append((loaded_json.name, loaded_json))
    for folder in data or []:
        loaded_set = ev.load_test_set(folder, id_list)
        tests.append((_recipe_set_name(recipe, folder) or loaded_set.name, loaded_set))
    if not tests and recipe is not None:
        tests = [(name, ev.load_test_set(recipe.data.set_path(p), id_list)) for name, p in recipe.data.test.items()]
    if not tests:
        raise SsltError("no test set: pass --data DIR (a prepared set) or --vggss-json FILE")
    for _, test in tests:
        for note in test.notes:
            err.print(f"note: {note}", highlight=False)
    return tests


def _recipe_set_name(recipe, folder: Path) -> str | None:
    """The recipe's name for a test set folder (``vggss`` for ``data/synthetic/test_vggss``), if it is one of its
    ``data.test`` sets: output folders are then named as training names them."""
    if recipe is None:
        return None
    for name, path in recipe.data.test.items():
        if recipe.data.set_path(path).resolve() == Path(folder).resolve():
            return name
    return None


# --------------------------------------------------------------------------------------------------------- retrieve

@app.command(epilog=_example("sslt retrieve runs/quickstart-20261125-101500 --task all --classes all"))
def retrieve(
    target: Path = typer.Argument(..., help="Run folder or checkpoint file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared set to retrieve in (default: the recipe's "
                                        "first test set)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels: vggsound.csv (ytid,start,label,split), "
                                          "id,label CSV, vggss.json or vggss (built-in) (default: the recipe's data.labels)."),
    task: str = typer.Option("all", "--task", help="all, or a comma list of a2a, a2i, i2a."),
    classes: str = typer.Option("all", help="all | novel (the recipe's data.holdout_classes) | comma list | file."),
    score: str = typer.Option("loc", help="Cross-modal score: loc (max of the cosine map) or pooled."),
    image_pool: str = typer.Option("avg", "--image-pool", help="Pooling of the visual map: avg or max."),
    which: str = typer.Option("auto", help="Checkpoint of a run folder: auto (best, else last), best or last."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run's retrieve/)."),
    gallery_rows: int = typer.Option(6, "--gallery-rows", min=0, help="Queries shown in each gallery PNG."),
    refresh: bool = typer.Option(False, help="Re-embed even when the cached embeddings are current."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
    branch: Optional[str] = typer.Option(None, "--branch", help=BRANCH_HELP),
    front_end: Optional[str] = typer.Option(None, "--front-end", help=FRONT_END_HELP),
) -> None:
    """Audio->audio, audio->image and image->audio retrieval with A@k, P@k, R@k, mAP and the random baseline."""
    from sslt_cli import retrieve as R
    from sslt_cli.distributed import pick_device
    from sslt_cli.progress import StepBars

    if out_dir is not None:
        writable_dir(out_dir, "--out")
    _check_family(family, branch, target, front_end)
    _check_inputs((labels, "--labels", "labels"))
    dev = pick_device(device, option="--device")
    options = R.RetrieveOptions.parse(task, classes=classes, cross_score=score, image_pool=image_pool,
                                      gallery_rows=gallery_rows, refresh=refresh, device=str(dev))
    model, clip_set, clip_labels = R.retrieval_inputs(target, data=data, labels=labels, which=which, device=dev,
                                                      out_dir=out_dir, family=family, branch=branch,
                                                      front_end=front_end)
    _check_outputs(model.out_dir, model.run.dir if model.run is not None else None, "sslt retrieve")
    with _tracking(model.run, model.recipe, f"retrieve-{model.checkpoint.stem}",
                   tags={"sslt.checkpoint": str(model.checkpoint)}) as sink, StepBars(err) as bars:
        report = R.retrieve(model, clip_set, clip_labels, options, sink, progress=bars.update,
                            say=lambda line: err.print(line, highlight=False, markup=False))
    out.print(R.results_table(report, title=f"retrieval: {clip_set.name}, classes {classes}"))
    for line in R.report_lines(report):
        err.print(line, highlight=False, markup=False)


def _held(folder: Path, what: str, main: bool = True):
    """Hold ``folder`` for this process (:func:`sslt_cli.folder_lock.hold`); nothing off rank 0, whose rank 0 holds
    it."""
    from contextlib import nullcontext

    from sslt_cli.folder_lock import hold

    return hold(folder, what) if main else nullcontext()


def _tracking(run, recipe, name: str, params: dict | None = None, tags: dict | None = None):
    """The MLflow run `sslt eval` and `sslt retrieve` record into: the run folder's own (:func:`run_tracking`),
    else one of their own named ``name`` (with ``params`` and ``tags``): a context giving the sink."""
    from sslt_cli.tracking import run_tracking, standalone_tracking

    if run is not None:
        return run_tracking(run, recipe if recipe is not None else run.recipe())
    return standalone_tracking(name, enabled=recipe.tracking.enabled if recipe is not None else True,
                               experiment=recipe.tracking.experiment if recipe is not None else "sslt",
                               params=params, tags=tags)


# ----------------------------------------------------------------------------------------------------------- ablate

@app.command(epilog=_example("sslt ablate paper_transformations base=quickstart"))
def ablate(
    file: Path = typer.Argument(..., help="Ablation file (a base recipe plus named rows or a grid, and seeds), "
                                "or the name of a shipped one (paper_transformations, per_transform, geo_weight, "
                                "baselines, hard_factors)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="base=NAME|PATH, name=, seeds=, synthetic.KEY= (the "
                                                    "generated data's sizes and knobs), or recipe overrides applied "
                                                    "to every cell."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Number of seeds per row (default: the seeds "
                                        "recorded in the ablation folder, else the file's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every cell and print the plan; train nothing."),
    report: bool = typer.Option(False, "--report", help="Rebuild the table, summary files and chart from finished "
                                "runs, without training."),
) -> None:
    """Run an ablation (each cell an ordinary run and an MLflow child run), resumable, with a table and a chart."""
    from sslt_cli import interrupts
    from sslt_cli.ablate import load_ablation, run_ablation

    if dry_run and report:
        raise SsltError("--dry-run and --report do not go together: --report rebuilds from finished runs")
    ablation = load_ablation(file, list(overrides or []))
    try:
        with interrupts.listening():
            result = run_ablation(ablation, seeds=seeds, dry_run=dry_run, report_only=report, console=err, out=out)
    except interrupts.Interrupted as stopped:
        err.print(f"interrupted by {stopped.signal_name} during the {stopped.phase}; run the same command again to "
                  "continue (finished cells are kept; the interrupted cell resumes from its last checkpoint, or "
                  "retrieves again)", highlight=False)
        raise typer.Exit(interrupts.EXIT_CODE) from None
    if result.interrupted:
        err.print("interrupted; run the same command again to continue (finished cells are kept)")
        raise typer.Exit(interrupts.EXIT_CODE)
    if result.failed:
        raise SsltError(f"{len(result.failed)} cell(s) failed; the others finished; run the same command again to "
                        "retry the failed ones",
                        [f"{cell.name}: {(cell.error or '').splitlines()[0] if cell.error else 'unknown error'}"
                         for cell in result.failed])


# ---------------------------------------------------------------------------------------------------------- compare

@app.command(epilog=_example("sslt compare lvs_vggss.pth.tar ezvsl_best.pth slavc_latest.pth --data data/vggss_test "
                             "--out compare-vggss"))
def compare(
    models: List[Path] = typer.Argument(..., help="Two or more checkpoint files (sslt, or released models of any "
                                        "family: SSL-TIE, LVS, SSL-Align, EZ-VSL, FNAC, SLAVC)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared test set folder (vggss_test or flickr_test "
                                        "layout)."),
    vggss_json: Optional[Path] = typer.Option(None, "--vggss-json", help="VGG-SS boxes from the public JSON (vggss: "
                                              "the built-in copy), with --media."),
    media: Optional[Path] = typer.Option(None, "--media", help="With --vggss-json: folder with frame/ and audio/."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="A published subset: a list file or a built-in name."),
    common: str = typer.Option("ezvsl", "--common", help=f"The protocol every model is also scored under (one of "
                               f"{', '.join(PROTOCOL_NAMES)}), on the (cos + 1) / 2 scale."),
    family: Optional[List[str]] = typer.Option(None, "--family", help="Once per model, in order: its family "
                                               f"({', '.join(FAMILY_CHOICES)}) or auto (recognised from its keys)."),
    branch: Optional[List[str]] = typer.Option(None, "--branch", help="Once per model, in order: online, momentum "
                                               "(SLAVC) or auto."),
    front_end: Optional[List[str]] = typer.Option(None, "--front-end", help="Once per model, in order: another "
                                                  f"evaluator's front end ({', '.join(FRONT_END_CHOICES)}) or auto "
                                                  "(its own)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./compare-<set>)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Clips per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Several models on the same clips: each under its own protocol and one common protocol; a table, per-clip
    agreement (CSV) and a picture of each model's maps; one MLflow run with a child per model."""
    from sslt_cli import compare as C
    from sslt_cli.distributed import pick_device
    from sslt_cli.progress import ClipProgress

    specs = _compare_specs(models, family, branch, front_end)
    tests = _eval_sets(None, [data] if data is not None else None, vggss_json, media, id_list)
    if len(tests) != 1:
        raise SsltError("sslt compare takes one test set: --data DIR, or --vggss-json FILE --media DIR")
    folder = out_dir or Path(f"compare-{tests[0][0]}")
    writable_dir(folder, "--out")
    options = C.CompareOptions(common=common, device=str(pick_device(device, option="--device")),
                               batch_size=batch_size)
    with _compare_tracking(tests[0][0], specs) as child_sink:
        comparison = C.compare(specs, tests[0], options, folder, child_sink=child_sink,
                               progress=lambda what, total: ClipProgress(err, what, total))
    out.print(C.comparison_table(comparison))
    for name, path in comparison.files.items():
        err.print(f"{name}: {path}", highlight=False)


def _compare_specs(models: List[Path], family: Optional[List[str]], branch: Optional[List[str]],
                   front_end: Optional[List[str]] = None) -> list:
    """The models of `sslt compare` with their --family / --branch / --front-end (each given once per model, or not
    at all)."""
    from sslt_cli.compare import ModelSpec

    if len(models) < 2:
        raise SsltError(f"sslt compare needs at least two models, got {len(models)}")
    for name, values in (("--family", family), ("--branch", branch), ("--front-end", front_end)):
        if values and len(values) != len(models):
            raise SsltError(f"{name} is given once per model, in order ({len(models)} models, {len(values)} "
                            f"{name}); use auto for a model whose default is right")
    families = [None if f == "auto" else f for f in (family or ["auto"] * len(models))]
    branches = [None if b == "auto" else b for b in (branch or ["auto"] * len(models))]
    front_ends = [None if e == "auto" else e for e in (front_end or ["auto"] * len(models))]
    for f, b, e in zip(families, branches, front_ends):
        _check_family(f, b, models[0], e)
    return [ModelSpec(path, f, b, e) for path, f, b, e in zip(models, families, branches, front_ends)]


@contextlib.contextmanager
def _compare_tracking(set_name: str, specs: list):
    """One MLflow parent run for a comparison; yields ``child_sink(label, tags)``, a context giving each model's
    sink (a child run of the parent)."""
    from sslt_cli.tracking import child_tracking, standalone_tracking

    with standalone_tracking(f"compare-{set_name}", tags={"sslt.compare": set_name},
                             params={"models": ",".join(str(s.path) for s in specs)}) as parent:
        yield lambda label, tags: child_tracking(label, parent_run_id=parent.run_id,
                                                 tags={**tags, "sslt.compare": set_name})


# ----------------------------------------------------------------------------------------------------------- export

@app.command(epilog=_example("sslt export runs/quickstart-20261125-101500 --which best --out ssltie_quickstart.pth.tar"))
def export(
    target: Path = typer.Argument(..., help="Run folder, sslt checkpoint, or a released checkpoint of any family."),
    out_file: Path = typer.Option(..., "--out", help="File to write (official SSL-TIE format, e.g. model.pth.tar)."),
    which: str = typer.Option("best", help="For a run folder: the best (validation cIoU) or the last checkpoint."),
    family: Optional[str] = typer.Option(None, "--family", help=f"Write the released format of this family "
                                         f"({', '.join(FAMILY_CHOICES)}; the network must be the family's: an sslt "
                                         "model can be written as ssltie, lvs or ssl_align). Default: official "
                                         "SSL-TIE."),
) -> None:
    """Export a model to the official SSL-TIE checkpoint format (state_dict keys imgnet.*, audnet.*, conv3, norm3), or
    to another family's released format (--family)."""
    if family is None:
        from sslt_cli.checkpoint import export_official

        source, written = export_official(target, out_file, which)
        described = "official SSL-TIE ({'epoch', 'state_dict', 'best_miou', 'optimizer', 'iteration'}; 257 tensors)"
    else:
        from sslt_cli.families import describe_format, export_as

        _check_family(family, None, target)
        source, written = export_as(target, family, out_file, which)
        described = describe_format(family)
    _print_mapping("export", {"read": str(source), "written": str(written), "format": described})


# --------------------------------------------------------------------------------------------------------- localize

@app.command(epilog=_example("sslt localize runs/quickstart-20261125-101500 street.mp4 clips/ --out loc/"))
def localize(
    model: Path = typer.Argument(..., help="Run folder, sslt checkpoint, or a released checkpoint of any family."),
    media: Optional[List[Path]] = typer.Argument(None, help="Video files (mp4, mkv, webm, mov) or folders of them."),
    out_dir: Path = typer.Option(Path("localize"), "--out", help="Output folder (index.html, a folder per input)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="A still frame; pair each with an --audio."),
    audio: Optional[List[Path]] = typer.Option(None, "--audio", help="The sound of the --image at the same place."),
    fps: float = typer.Option(2.0, "--fps", min=0.01, help="Frames sampled per second of video."),
    window: Optional[float] = typer.Option(None, "--window", min=0.05, help="Seconds of audio per frame, centred on "
                                           "it (default: the recipe's clip length, what the model was trained on)."),
    maps: bool = typer.Option(False, "--maps", help="Also save the raw maps (maps.npz, as sslt eval --maps reads)."),
    which: str = typer.Option("best", help="For a run folder: the best (validation cIoU) or the last checkpoint."),
    calibrate_on: Optional[Path] = typer.Option(None, "--calibrate-on", help="Prepared set to calibrate the "
                                                "'visible' score on (default: the run's validation set)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="The recipe the model was trained with (image "
                                          "size, audio front end): for official checkpoints, which do not carry it."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Frames per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    family: Optional[str] = typer.Option(None, "--family", help=FAMILY_HELP),
    branch: Optional[str] = typer.Option(None, "--branch", help=BRANCH_HELP),
    front_end: Optional[str] = typer.Option(None, "--front-end", help=FRONT_END_HELP),
) -> None:
    """Where is the sound? Heatmap videos, contact sheets, per-frame CSV/JSON and an index.html for your own media."""
    from sslt_cli.config import load_recipe
    from sslt_cli.distributed import pick_device
    from sslt_cli.localize import LocalizeOptions, localize as run_localize

    _check_family(family, branch, model, front_end)
    writable_dir(out_dir, "--out")
    _check_inputs(*[(path, "--image", None) for path in image or []], *[(path, "--audio", None) for path in audio or []],
                  (recipe, "--recipe", None))
    options = LocalizeOptions(fps=fps, window=window, batch_size=batch_size, save_maps=maps)
    result = run_localize(model, media or [], out_dir, images=image or [], audios=audio or [], options=options,
                          device=pick_device(device, option="--device"), which=which, calibrate_on=calibrate_on,
                          recipe=load_recipe(recipe) if recipe is not None else None, family=family, branch=branch,
                          front_end=front_end, report=lambda line: err.print(line, highlight=False, markup=False))
    done = len(result.inputs) - len(result.failed)
    out.print(f"{done} of {len(result.inputs)} input(s) localised: open {result.page}", highlight=False)
    if result.failed:
        raise SsltError(f"{len(result.failed)} input(s) could not be localised (the others are in {result.page})",
                        [item.error or "" for item in result.failed])


# ------------------------------------------------------------------------------------------------------------- runs

@app.command(epilog=_example("sslt runs --runs-dir runs"))
def runs(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder holding run folders.")) -> None:
    """A table of runs (name, recipe, status, key metrics) read from the run folders."""
    from rich.table import Table

    from sslt_cli.learning_check import verdict
    from sslt_cli.runs import list_runs

    found = list_runs(runs_dir)
    if not found:
        err.print(f"no runs under {runs_dir}")
        return
    table = Table(title=f"runs in {runs_dir}")
    for col in ("run", "recipe", "status", "step", "learning", "val cIoU (best)", "test set", "test cIoU",
                "test AUC"):
        table.add_column(col)
    stale, not_learning = [], []
    for run in found:
        meta = run.meta()
        records = run.metrics()
        steps = [r.get("step", 0) for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val" and "ciou" in r]
        test = [r for r in records if r.get("kind") == "test" and "ciou" in r]
        best_val = max((r["ciou"] for r in val), default=None)
        # the best checkpoint (chosen on validation) on the first test set, else the latest test record
        first_set = test[0].get("set") if test else None
        chosen = [r for r in test if r.get("set") == first_set and r.get("checkpoint") == "best"] or test
        shown = chosen[-1] if chosen else {}
        where = f"{shown.get('set', '')} ({shown.get('checkpoint', '')})" if shown else "-"
        state = run.state()
        if state.startswith("stale"):
            stale.append(run)
        if verdict(meta) == "NOT LEARNING":
            not_learning.append((run, meta["learning_check"].get("message", "")))
        table.add_row(run.dir.name, str(meta.get("recipe_name", "")), state,
                      str(max(steps) if steps else 0), verdict(meta), _fmt(best_val), where, _fmt(shown.get("ciou")),
                      _fmt(shown.get("auc")))
    out.print(table)
    for run, message in not_learning:
        err.print(f"{run.dir.name}: {message}", highlight=False, markup=False)
    for run in stale:
        err.print(f"{run.dir.name}: its process is gone (killed, out of memory or a lost node); {run.resume_hint()}",
                  highlight=False)


@app.command(epilog=_example("sslt sync runs/quickstart-20261125-101500"))
def sync(run_dir: Path = typer.Argument(..., help="Run folder whose numbers MLflow should hold.")) -> None:
    """Send what the MLflow store lacks of a run folder: every metric (evaluations and baselines included),
    parameters, tags and artifacts (after a store failure, or to another store); a second sync sends nothing."""
    from sslt_cli.runs import Run
    from sslt_cli.tracking import sync_run

    report = sync_run(Run.open(run_dir))
    err.print(f"{run_dir}: {report.metrics} values, {report.params} parameters, {report.tags} tags and "
              f"{report.artifacts} artifact files sent to MLflow run {report.run_id} "
              f"({'created' if report.created else 'already there'}) at {report.uri}"
              + (f"; marked {report.status}" if report.status else ""), highlight=False)


# --------------------------------------------------------------------------------------------------------------- ui

@app.command(epilog=_example("sslt ui --port 5000"))
def ui(
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(5000, help="Port."),
) -> None:
    """Start the MLflow UI on the project's tracking store and print its URL."""
    import subprocess

    from sslt_cli.tracking import tracking_uri

    uri = tracking_uri()
    if not uri.startswith(("sqlite:", "file:", "postgresql", "mysql")) and "://" in uri:
        out.print(f"MLFLOW_TRACKING_URI points at a server ({uri}): open it in a browser; nothing to start.")
        return
    typer.echo(f"MLflow UI on {uri}: http://{host}:{port}  (Ctrl-C stops it)", err=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    # one web worker and no background job runners: a laptop-sized UI that starts fast
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        subprocess.run(cmd, check=False, env=env)
    except KeyboardInterrupt:
        pass


# ------------------------------------------------------------------------------------------------------- helpers

def _check_inputs(*inputs: tuple[Optional[Path], str, Optional[str]]) -> None:
    """Each given (path, option, built-in kind or None) names a readable file, before any work
    (:func:`~sslt_cli.preflight.readable_file`)."""
    for path, what, kind in inputs:
        if path is not None:
            readable_file(path, what, kind)


def _check_outputs(out_dir: Path, run_dir: Optional[Path], command: str) -> None:
    """Before any work: the output folder and, for a model in a run folder, the run folder (its metrics.jsonl,
    meta.json and train.log record the numbers) can be written."""
    if run_dir is not None:
        writable_dir(run_dir, "run folder", why=f"{command} records its numbers in the run folder (metrics.jsonl, "
                                                 "meta.json)")
    writable_dir(out_dir, "output folder")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _print_mapping(title: str, mapping: dict) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("key")
    table.add_column("value")
    for k, v in mapping.items():
        table.add_row(str(k), _fmt(v) if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items()))
    out.print(table)


def _print_prepare(result, indexed: bool = False) -> None:
    """The final table of a prepare run: requested, prepared, already done, missing, failed by reason; for
    ``sslt prepare index`` (``indexed``), which writes no media: clips found, complete, incomplete by reason."""
    from rich.table import Table

    for note in result.notes:
        err.print(f"note: {note}", highlight=False)
    table = Table(title=f"{'indexed' if indexed else 'prepared'} {result.out} ({result.layout})")
    table.add_column("clips")
    table.add_column("count", justify="right")
    if indexed:
        table.add_row("listed", str(result.requested))
        table.add_row("complete (headers read, boxes parsed)", str(result.already_done))
        table.add_row("incomplete: a file is absent or empty", str(result.missing))
    else:
        table.add_row("requested", str(result.requested))
        table.add_row("prepared now", str(result.prepared))
        table.add_row("already done", str(result.already_done))
        table.add_row("missing (no source video)", str(result.missing))
    for reason, count in sorted(result.failed.items()):
        table.add_row(f"{'incomplete' if indexed else 'failed'}: {reason}", str(count))
    table.add_row("usable", str(result.ok))
    out.print(table)
    err.print(f"manifest: {result.manifest}")


def main() -> None:
    """Console entry point: user errors print one message on stderr and exit 1, without a traceback."""
    try:
        app()
    except SsltError as exc:
        from rich.markup import escape

        err.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; finished work is kept: run the same command again to continue "
                  "(for training: sslt train --resume RUN_DIR)")
        sys.exit(130)


if __name__ == "__main__":
    main()
