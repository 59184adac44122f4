"""The ``sslt`` command line: parses, calls, prints. The only Typer module.

Heavy libraries (torch, mlflow, cv2, av) are imported inside the commands so ``sslt --help`` is instant.
Results go to stdout; progress and diagnostics to stderr.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from sslt_cli.errors import SsltError

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
    epilog="Example: sslt prepare synthetic --out data/synthetic && sslt train recipes/quickstart.yaml",
)
prepare_app = typer.Typer(
    help="Prepare data sets in the layouts train/eval read (writes a manifest; never crawls at train time).",
    no_args_is_help=True,
    epilog="Example: sslt prepare synthetic --out data/synthetic",
)
app.add_typer(prepare_app, name="prepare")


def _example(text: str) -> str:
    return f"Example: {text}"


# ---------------------------------------------------------------------------------------------------------- prepare

@prepare_app.command("synthetic", epilog=_example("sslt prepare synthetic --out data/synthetic --train 2000 --seed 0"))
def prepare_synthetic(
    out_dir: Path = typer.Option(..., "--out", help="Output folder (created)."),
    n_train: int = typer.Option(2000, "--train", min=1, help="Training clips."),
    n_val: int = typer.Option(200, "--val", min=1, help="Validation clips (with boxes; never the test set)."),
    n_test: int = typer.Option(500, "--test", min=1, help="VGG-SS-style test clips."),
    n_flickr: int = typer.Option(250, "--flickr", min=1, help="Flickr-style test clips."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files."),
    image_size: int = typer.Option(224, "--image-size", min=32, help="Frame size in pixels (square)."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=16000, max=48000, help="Audio sample rate (Hz; the sounds reach 7 kHz)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: CPU count, at most 4)."),
    force: bool = typer.Option(False, help="Regenerate into a folder made with other parameters."),
) -> None:
    """Generate the embedded synthetic benchmark in the real layouts (train, val, VGG-SS-style and Flickr-style test)."""
    from sslt_cli.data.synthetic import generate

    summary = generate(out_dir, n_train=n_train, n_val=n_val, n_test=n_test, n_flickr=n_flickr, seed=seed,
                       image_size=image_size, sample_rate=sample_rate, workers=workers, force=force, progress=True)
    _print_mapping("synthetic benchmark", summary)


@prepare_app.command("vggsound", epilog=_example(
    "sslt prepare vggsound --videos ~/vggsound/video --out data/vggsound/train --split train --workers 8"))
def prepare_vggsound(
    videos: Path = typer.Option(..., "--videos", help="Folder of VGGSound clips (<ytid>_<start>.mp4 or <ytid>_<start>_<end>.mp4)."),
    out_dir: Path = typer.Option(..., "--out", help="Output set folder."),
    split: str = typer.Option("train", help="train (frame 125 + 3 s audio) or test (VGG-SS layout, 10 s audio, boxes)."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids to prepare (a published list); missing videos are reported."),
    vggss_json: Optional[Path] = typer.Option(None, "--vggss-json", help="VGG-SS boxes for --split test (anno/<id>.xml)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="vggsound.csv (ytid,start,label,split) for the label column."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=4000, help="Output audio rate (mono)."),
    neighbours: int = typer.Option(0, min=0, help="Also write this many frames either side of frame 125."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: CPU count)."),
) -> None:
    """Prepare VGGSound clips: frame 125 (t = 5 s) as JPEG and the audio window, with a manifest; resumable."""
    from sslt_cli.data.prepare import prepare_vggsound as run

    if split not in ("train", "test"):
        raise SsltError(f"--split must be train or test, got {split!r}")
    _print_prepare(run(videos, out_dir, split=split, id_list=id_list, vggss_json=vggss_json, labels=labels,
                       sample_rate=sample_rate, neighbours=neighbours, workers=workers, progress=True))


@prepare_app.command("flickr", epilog=_example(
    "sslt prepare flickr --archive ~/Flickr-SoundNet --out data/flickr/test_flickr --split test "
    "--list ../shared/realdata/flickr_test_249.csv"))
def prepare_flickr(
    archive: Path = typer.Option(..., "--archive", help="The Flickr-SoundNet download (Annotations/ + Data/)."),
    out_dir: Path = typer.Option(..., "--out", help="Output set folder."),
    split: str = typer.Option("test", help="test (frames, audio, 3-annotator boxes) or train."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids to prepare (e.g. the 249/250 test list)."),
    sample_rate: int = typer.Option(16000, "--sample-rate", min=4000, help="Output audio rate (mono)."),
    seconds: Optional[float] = typer.Option(None, help="Audio seconds kept (default: 10 for test, 4 for train)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes."),
) -> None:
    """Prepare the Flickr-SoundNet test set (or training pairs) from the downloaded archive, with a manifest."""
    from sslt_cli.data.prepare import prepare_flickr as run

    if split not in ("train", "test"):
        raise SsltError(f"--split must be train or test, got {split!r}")
    _print_prepare(run(archive, out_dir, split=split, id_list=id_list, sample_rate=sample_rate, seconds=seconds,
                       workers=workers, progress=True))


@prepare_app.command("vggss-annotations", epilog=_example(
    "sslt prepare vggss-annotations --json ../shared/realdata/vggss.json --out data/vggss/anno"))
def prepare_vggss_annotations(
    json_path: Optional[Path] = typer.Option(None, "--json", help="vggss.json to convert into per-clip XML."),
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


@prepare_app.command("index", epilog=_example(
    "sslt prepare index ~/vggss_test --layout vggss_test --list ../shared/realdata/ssltie_test_vggss_4911.txt"))
def prepare_index(
    root: Path = typer.Argument(..., help="A folder already in one of the layouts (made by other tools)."),
    layout: str = typer.Option(..., help="vggsound_train | vggss_test | flickr_test | flickr_train."),
    id_list: Optional[Path] = typer.Option(None, "--list", help="Ids expected (default: every clip found)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="vggsound.csv or id,label CSV."),
) -> None:
    """Write the manifest for a folder laid out by other tools (checks each clip's files; missing ones are listed)."""
    from sslt_cli.data.prepare import index_existing

    _print_prepare(index_existing(root, layout, id_list, labels=labels))


# ------------------------------------------------------------------------------------------------------------ train

@app.command(epilog=_example("sslt train recipes/quickstart.yaml optim.epochs=2 --dry-run"))
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=3e-4."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the run folder; do nothing."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder from its last checkpoint."),
) -> None:
    """Train SSL-TIE (or a baseline) from a recipe; writes a run folder and mirrors it to MLflow."""
    from sslt_cli.config import dump_yaml, load_recipe, recipe_dict

    overrides = list(overrides or [])
    if resume is not None:
        from sslt_cli.runs import Run

        run = Run.open(resume)
        if overrides:
            raise SsltError("--resume continues a run with its saved recipe; overrides are not allowed",
                            [f"got {' '.join(overrides)}; start a new run to change the recipe"])
        if dry_run:
            out.print(dump_yaml(recipe_dict(run.recipe())), end="")
            err.print(f"would resume {run.dir}")
            return
        from sslt_cli.train import train as run_training

        run_training(run.recipe(), resume_run=run, console=err, out=out)
        return
    resolved = load_recipe(recipe, overrides)
    if dry_run:
        out.print(dump_yaml(recipe_dict(resolved)), end="", markup=False, highlight=False)
        err.print(f"would create a run folder under {Path(resolved.runs_dir) / (resolved.name + '-<timestamp>')}")
        return
    from sslt_cli.train import train as run_training

    run_training(resolved, overrides=overrides, console=err, out=out, recipe_path=str(recipe))


# ------------------------------------------------------------------------------------------------------------- runs

@app.command(epilog=_example("sslt runs --runs-dir runs"))
def runs(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Folder holding run folders.")) -> None:
    """A table of runs (name, recipe, status, key metrics) read from the run folders."""
    from rich.table import Table

    from sslt_cli.runs import list_runs

    found = list_runs(runs_dir)
    if not found:
        err.print(f"no runs under {runs_dir}")
        return
    table = Table(title=f"runs in {runs_dir}")
    for col in ("run", "recipe", "status", "step", "val cIoU (best)", "test cIoU", "test AUC"):
        table.add_column(col)
    for run in found:
        meta = run.meta()
        records = run.metrics()
        steps = [r.get("step", 0) for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val" and "ciou" in r]
        test = [r for r in records if r.get("kind") == "test" and "ciou" in r]
        best_val = max((r["ciou"] for r in val), default=None)
        last_test = test[-1] if test else {}
        table.add_row(run.dir.name, str(meta.get("recipe_name", "")), str(meta.get("status", "")),
                      str(max(steps) if steps else 0), _fmt(best_val), _fmt(last_test.get("ciou")),
                      _fmt(last_test.get("auc")))
    out.print(table)


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
    err.print(f"MLflow UI on {uri}: http://{host}:{port}  (Ctrl-C stops it)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    try:
        subprocess.run(cmd, check=False)
    except KeyboardInterrupt:
        pass


# ------------------------------------------------------------------------------------------------------- helpers

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


def _print_prepare(result) -> None:
    """The final table of a prepare run: requested, prepared, already done, missing, failed by reason."""
    from rich.table import Table

    for note in result.notes:
        err.print(f"note: {note}", highlight=False)
    table = Table(title=f"prepared {result.out} ({result.layout})")
    table.add_column("clips")
    table.add_column("count", justify="right")
    table.add_row("requested", str(result.requested))
    table.add_row("prepared now", str(result.prepared))
    table.add_row("already done", str(result.already_done))
    table.add_row("missing (no source video)", str(result.missing))
    for reason, count in sorted(result.failed.items()):
        table.add_row(f"failed: {reason}", str(count))
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
