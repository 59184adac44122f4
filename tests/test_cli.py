"""The ``sslt`` command line: fast help with examples, --dry-run, user errors without traceback, eval on the real
VGG-SS boxes, runs, ui."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import typer.main
from typer.testing import CliRunner

from sslt_cli.catalog import builtin_recipes
from sslt_cli.cli import app
from sslt_cli.config import load_recipe, parse_yaml, recipe_dict, validate_tree
from sslt_cli.errors import SsltError
from sslt_cli.runs import Run

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def command_paths(group=None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every registered command and group as its argument path; () is ``sslt`` itself."""
    group = group or typer.main.get_command(app)
    paths = [prefix]
    for name, command in sorted(getattr(group, "commands", {}).items()):
        paths += command_paths(command, prefix + (name,))
    return paths


def help_example(path: tuple[str, ...]) -> str:
    """The last non-empty line of ``sslt <path> --help``."""
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return [line.strip() for line in result.stdout.splitlines() if line.strip()][-1]


def sslt(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m sslt_cli`` (the console entry point ``sslt_cli.cli.main``) in the working folder."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    full_env.update({"NO_COLOR": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "sslt_cli", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


# --- help -----------------------------------------------------------------------------------------------------------

def test_help_is_instant_and_imports_neither_torch_nor_mlflow() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sslt_cli", "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **WIDE})
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "train" in result.stdout
    # -X importtime writes "import time: self | cumulative | package.module" per imported module.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "mlflow", "cv2", "av", "torchvision", "pandas")}
    assert heavy == set()


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(("sslt",) + p))
def test_every_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    assert help_example(path).startswith("Example: " + " ".join(("sslt",) + path))


def test_every_command_of_the_issue_exists() -> None:
    assert {p[0] for p in command_paths() if p} >= {"prepare", "train", "eval", "retrieve", "ablate", "runs", "ui"}


def test_the_train_example_runs() -> None:
    example = help_example(("train",)).removeprefix("Example: sslt ").split()
    args = [str(REPO_ROOT / a) if a.startswith("recipes/") else a for a in example]
    assert "--dry-run" in args
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{result.exception!r} {result.output}"


# --- train --dry-run ------------------------------------------------------------------------------------------------

def test_dry_run_prints_the_resolved_recipe() -> None:
    Path("recipe.yaml").write_text("name: t\noptim:\n  lr: 2e-5\n  epochs: 3\n")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", "optim.lr=3e-4", "data.test={vggss: a}", "--dry-run"])
    assert result.exit_code == 0, result.output
    expected = load_recipe("recipe.yaml", ["optim.lr=3e-4", "data.test={vggss: a}"])
    printed = parse_yaml(result.stdout)
    assert printed == recipe_dict(expected)
    assert validate_tree(printed, "stdout") == expected
    assert (printed["optim"]["lr"], printed["optim"]["epochs"], printed["optim"]["batch_size"]) == (3e-4, 3, 32)
    assert result.stderr == "would create a run folder under runs/t-<timestamp>\n"
    assert not Path("runs").exists()


def test_dry_run_output_survives_long_values() -> None:
    root = "/data/" + "x" * 100 + "/vggsound"
    Path("recipe.yaml").write_text("name: t\n")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", f"data.root={root}", "--dry-run"], env={"COLUMNS": "80"})
    assert parse_yaml(result.stdout)["data"]["root"] == root


def test_resume_dry_run_prints_the_saved_recipe() -> None:
    Path("recipe.yaml").write_text("name: t\n")
    recipe = load_recipe("recipe.yaml", ["data.holdout_classes=[dog, cat]"])
    run = Run.create(recipe, argv=[])
    result = CliRunner().invoke(app, ["train", "--resume", str(run.dir), "--dry-run"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert parse_yaml(result.stdout) == recipe_dict(recipe)


def test_resume_with_a_recipe_file_is_refused() -> None:
    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[])
    Path("other.yaml").write_text("name: other\noptim:\n  lr: 0.5\n")
    result = sslt("train", "--resume", str(run.dir), "other.yaml", env=WIDE)
    assert result.returncode == 1
    assert result.stderr == (f"error: --resume continues {run.dir} with the recipe saved in it; a recipe file is not "
                             f"allowed\n  - got other.yaml: drop it to resume, or start a new run with `sslt train "
                             "other.yaml`\n")


# --- user errors: exit 1, message on stderr, no traceback -----------------------------------------------------------

@pytest.mark.parametrize(("recipe", "overrides", "message"), [
    ("optim:\n  lrr: 1e-4\n", [],
     "error: recipe.yaml: 1 problem(s) in the recipe\n"
     "  - recipe.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?)\n"),
    ("optim:\n  batch_size: abc\n", [],
     "error: recipe.yaml: 1 problem(s) in the recipe\n"
     "  - recipe.yaml: key 'optim.batch_size': expected an integer, got 'abc'\n"),
    ("name: t\n", ["bad", "optim.lrr=3e-4"],
     "error: recipe.yaml: 2 problem(s) in the recipe\n"
     "  - override 'bad' is not of the form key=value: write overrides as dotted.key=value, "
     "e.g. optim.lr=3e-4 data.root=/data/vggsound\n"
     "  - recipe.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?) (from override 'optim.lrr=3e-4')\n"),
], ids=["typo", "wrong-type", "bad-override"])
def test_a_bad_recipe_exits_1_with_the_message_on_stderr(recipe: str, overrides: list[str], message: str) -> None:
    Path("recipe.yaml").write_text(recipe)
    result = sslt("train", "recipe.yaml", *overrides, "--dry-run")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", message)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "error: recipe.yaml: the recipe is empty (only blank lines or comments); nothing to run\n"
          "  - write the settings that differ from the defaults, starting from a shipped recipe (e.g. "
          "recipes/quickstart.yaml)\n"),
    (b"# a recipe\n\n# with only comments\n", "error: recipe.yaml: the recipe is empty (only blank lines or "
     "comments); nothing to run\n  - write the settings that differ from the defaults, starting from a shipped recipe "
     "(e.g. recipes/quickstart.yaml)\n"),
    (b"{}\n", "error: recipe.yaml: the recipe is empty (an empty mapping, {}); nothing to run\n  - write the settings "
     "that differ from the defaults, starting from a shipped recipe (e.g. recipes/quickstart.yaml)\n"),
    (b"# comment\n{ }  # nothing\n", "error: recipe.yaml: the recipe is empty (an empty mapping, {}); nothing to run\n"
     "  - write the settings that differ from the defaults, starting from a shipped recipe (e.g. "
     "recipes/quickstart.yaml)\n"),
    (b"name: t\noptim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
     "error: recipe.yaml: key 'lr' appears twice, on line 3 and line 5; keep one of them\n"),
    (b"name: t\noptim: {lr: 1}\noptim: {epochs: 2}\n",
     "error: recipe.yaml: key 'optim' appears twice, on line 2 and line 3; keep one of them\n"),
    (b"name: t\n# caf\xe9 au lait\n", "error: recipe.yaml: not UTF-8 text: byte 0xe9 at byte offset 13 (line 2) "
     "cannot be decoded\n  - save the recipe as UTF-8\n"),
], ids=["empty", "comments-only", "empty-mapping", "empty-mapping-commented", "duplicate-key", "duplicate-section",
        "latin-1"])
def test_recipes_that_would_run_on_defaults_or_lose_a_value_are_refused(content: bytes, message: str) -> None:
    Path("recipe.yaml").write_bytes(content)
    result = sslt("train", "recipe.yaml", "--dry-run", env=WIDE)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", message)


def test_other_user_errors_exit_1_without_traceback() -> None:
    result = sslt("train", "missing.yaml")
    assert (result.returncode, result.stderr) == (
        1, "error: missing.yaml: recipe file not found\n  - give a path, or the name of one shipped with sslt: "
           f"{', '.join(builtin_recipes())}\n")
    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[])
    result = sslt("train", "--resume", str(run.dir), "optim.lr=1")
    assert (result.returncode, result.stderr) == (
        1, "error: --resume continues a run with its saved recipe; overrides are not allowed\n"
           "  - got optim.lr=1; start a new run to change the recipe\n")
    assert "Traceback" not in result.stderr


# --- sslt eval ------------------------------------------------------------------------------------------------------

# The README's "Baselines on the real VGG-SS boxes" (protocol ssltie, cIoU / AUC x100), per list: N, the excluded
# clips (empty ground truth once clipped to [0, 1]), the defective boxes of the listed clips, the note on the whole
# file's defects (printed when the list leaves some out) and the table rows. The lists and vggss.json are the
# built-in copies (sslt_cli/resources), named by their short names as a user would.
README_BASELINES = {
    "vggss-5158": (5156, ["M1P1xla8rg0_000000", "MKC9LvRivTM_000030"], 30, None, {
        "centre prior": ["33.96", "37.44"], "random map (3 seeds)": ["0.08", "21.68"],
        "whole frame": ["21.96", "31.27"], "oracle ceiling": ["50.50", "49.49"]}),
    "ssltie-vggss-4911": (4911, [], 5, (
        "note: vggss.json as a whole (5158 clips): 12 boxes with a non-finite or huge coordinate, 18 degenerate "
        "boxes; in the 4911 requested clips: 5 degenerate boxes"), {
        "centre prior": ["33.94", "37.40"], "random map (3 seeds)": ["0.15", "21.64"],
        "whole frame": ["21.97", "31.24"], "oracle ceiling": ["50.52", "49.45"]}),
}


def words(text: str) -> str:
    """The text with every run of whitespace made one space: rich wraps long titles and captions."""
    return " ".join(text.split())


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the eval table on stdout: method -> [cIoU, AUC, mean IoU, pointing, pred. area], the
    random baseline's ±std dropped."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 6:
            rows[cells[0]] = [cell.split("±")[0] for cell in cells[1:]]
    return rows


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("id_list", list(README_BASELINES))
def test_eval_baselines_only_on_the_real_vggss_boxes(id_list: str) -> None:
    n, excluded, defects, whole_file_note, figures = README_BASELINES[id_list]
    result = CliRunner().invoke(app, ["eval", "--baselines-only", "--vggss-json", "vggss", "--list", id_list],
                                env=WIDE)
    assert result.exit_code == 0, result.output
    name = id_list
    assert f"{name}: baselines only · protocol ssltie · N = {n}" in words(result.stdout)
    rows = table_rows(result.stdout)
    assert {method: cells[:2] for method, cells in rows.items() if not method.startswith("published")} == figures
    # the papers' numbers on VGG-SS beside them: SSL-TIE's on its own 4911 list and protocol is unmarked
    published = {method: cells[:2] for method, cells in rows.items() if method.startswith("published")}
    ssltie = "published: SSL-TIE, VGGSound-144k" + ("" if id_list == "ssltie-vggss-4911" else "*")
    assert published[ssltie] == ["38.63", "39.65"]
    assert published["published: LVS, VGGSound-144k*"] == ["34.40", "38.20"]
    assert published["published: SSL-Align, VGGSound-144k?"] == ["41.42", "-"]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    if whole_file_note:
        assert notes[-1] == whole_file_note
    else:
        assert not any(" as a whole " in note for note in notes)
    folder = Path("eval") / f"{name}-baselines-ssltie"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n"] == n and metrics["published"]["list"] == id_list
    assert {(e["method"], e["ciou"], e["same_list"]) for e in metrics["published"]["entries"]} >= {
        ("SSL-TIE", 0.3863, id_list == "ssltie-vggss-4911"), ("EZ-VSL", 0.3885, id_list == "vggss-5158")}
    assert [row[0] for row in csv_rows(folder / "excluded.csv")[1:]] == excluded
    listed = csv_rows(folder / "defects.csv")
    assert len(listed) == 1 + defects and listed[0] == ["id", "xmin", "ymin", "xmax", "ymax", "defect"]
    assert ["UyCw7pCgYg8_000055", "0.00625", "0.015625", "0.00625", "0.015625", "degenerate"] in listed


@pytest.mark.parametrize("with_bom", ["list", "boxes"])
def test_a_list_or_a_box_file_saved_with_a_utf8_bom_reads_as_without_it(with_bom: str) -> None:
    """Windows editors save UTF-8 with a byte-order mark: it is not part of the first id (issue 22)."""
    from sslt_cli.catalog import RESOURCES_DIR

    for name, source, kind in (("list.txt", "ssltie_test_vggss_4911.txt", "list"), ("vggss.json", "vggss.json", "boxes")):
        Path(name).write_bytes((b"\xef\xbb\xbf" if kind == with_bom else b"") + (RESOURCES_DIR / source).read_bytes())
    result = CliRunner().invoke(app, ["eval", "--baselines-only", "--vggss-json", "vggss.json", "--list", "list.txt",
                                      "--out", "bom"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "· N = 4911" in words(result.stdout)
    published = {method: cells[:2] for method, cells in table_rows(result.stdout).items()
                 if method.startswith("published")}
    assert published["published: SSL-TIE, VGGSound-144k"] == ["38.63", "39.65"]  # SSL-TIE's own list, unmarked
    assert json.loads((Path("bom") / "metrics.json").read_text())["published"]["list"] == "ssltie-vggss-4911"


def test_eval_maps_of_the_centre_prior_score_as_the_centre_prior_baseline(tmp_path: Path) -> None:
    from sslt_cli.catalog import RESOURCES_DIR
    from sslt_cli.data.annotations import read_id_list
    from sslt_cli.metrics import centre_prior_map

    id_list = RESOURCES_DIR / "vggss_test_5158.csv"  # given by its path: a file always works
    np.save(tmp_path / "centre.npy", centre_prior_map())  # on the protocol's 224 x 224 grid: no upsampling
    maps = tmp_path / "maps"
    maps.mkdir()
    for cid in read_id_list(id_list):
        (maps / f"{cid}.npy").symlink_to(tmp_path / "centre.npy")
    result = CliRunner().invoke(app, ["eval", "--maps", str(maps), "--vggss-json", "vggss", "--list", str(id_list)],
                                env=WIDE)
    assert result.exit_code == 0, result.output
    assert "protocol ssltie · N = 5156" in words(result.stdout)
    rows = table_rows(result.stdout)
    assert rows["vggss_test_5158"] == rows["centre prior"]
    assert rows["centre prior"][:2] == README_BASELINES["vggss-5158"][4]["centre prior"]


def test_eval_maps_need_no_frames_or_audio(tmp_path: Path) -> None:
    ids = ["zpWuikVorYg_000032", "-0BIyqJj9ZU_000030", "gEvCUcZ6w88_000030"]
    (tmp_path / "list.txt").write_text("\n".join(ids) + "\n")
    maps = tmp_path / "maps"
    maps.mkdir()
    for i, cid in enumerate(ids):
        np.save(maps / f"{cid}.npy", np.random.default_rng(i).random((14, 14), dtype=np.float32))
    media = tmp_path / "media"  # the first clip's frame only: no clip has both its frame and its audio
    (media / "frame").mkdir(parents=True)
    (media / "frame" / f"{ids[0]}.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["eval", "--maps", str(maps), "--vggss-json", "vggss",
                                      "--media", str(media), "--list", str(tmp_path / "list.txt"),
                                      "--out", "out"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "N = 3" in words(result.stdout) and "3 requested = 3 scored" in words(result.stdout)
    assert csv_rows(Path("out/excluded.csv")) == [["id", "stage", "reason"]]


@pytest.mark.parametrize(("args", "message"), [
    (["--baselines-only", "--extended", "plus_silent.csv"],
     "--extended does not go with --baselines-only: the extended evaluation ranks pairs by the confidence of their "
     "maps, and the baselines have no confidence scores\n"
     "  - score a model (RUN or CHECKPOINT) or --maps with --silent-maps, or drop --extended"),
    (["--maps", "maps", "--extended", "plus_silent.csv"],
     "--extended with --maps needs --silent-maps: the maps of the non-sounding pairs, keyed '<video>+<audio>' (a "
     "folder of .npy files or one .npz)"),
    (["--baselines-only", "--silent-maps", "silent"],
     "--silent-maps goes with --maps and --extended (SLAVC's *_plus_silent.csv); add both, or drop --silent-maps"),
    (["--maps", "maps", "--extended", "plus_silent.csv", "--silent-maps", "silent", "--silent-data", "set"],
     "--silent-data goes with a model (RUN or CHECKPOINT) and --extended; with --maps, give the non-sounding pairs' "
     "maps with --silent-maps"),
    (["model.pt", "--vggss-json", "vggss.json"],
     "--vggss-json vggss.json holds boxes only: running a model on them needs the frames and audio too\n"
     "  - pass --media DIR, a folder with frame/<id>.jpg and audio/<id>.wav (the vggss_test layout), or score "
     "precomputed maps (--maps) or only the baselines (--baselines-only)"),
], ids=["extended-baselines", "extended-maps-alone", "silent-maps-alone", "silent-data-with-maps", "model-no-media"])
def test_eval_option_combinations_that_cannot_work(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["eval", *args])
    assert isinstance(result.exception, SsltError), result.output
    assert result.exception.render() == message


def test_eval_extended_with_baselines_only_exits_1_with_the_message() -> None:
    result = sslt("eval", "--baselines-only", "--extended", "plus_silent.csv", "--vggss-json", "vggss.json")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: --extended does not go with --baselines-only: ")


def test_eval_progress_shows_clips_per_second_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from rich.console import Console

    from sslt_cli.progress import ClipProgress

    console = Console(record=True, force_terminal=True, width=120)
    with ClipProgress(console, "vggss (last)", 10) as advance:
        for _ in range(4):
            advance(2)
            time.sleep(0.05)
    # the finished bar: full although 2 of the 10 clips were dropped, with the average rate
    assert re.search(r"vggss \(last\) ━+ 8/8 \d+\.\d clips/s ETA 0:00:00$", console.export_text().rstrip())


# --- sslt runs ------------------------------------------------------------------------------------------------------

def test_runs_table() -> None:
    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[])
    for record in ({"kind": "train", "step": 10, "loss": 1.0}, {"kind": "val", "step": 10, "ciou": 0.3},
                   {"kind": "train", "step": 20, "loss": 0.5}, {"kind": "val", "step": 20, "ciou": 0.25},
                   {"kind": "test", "step": 20, "set": "vggss", "checkpoint": "last", "ciou": 0.375, "auc": 0.4},
                   {"kind": "test", "step": 10, "set": "vggss", "checkpoint": "best", "ciou": 0.5, "auc": 0.45},
                   {"kind": "test", "step": 10, "set": "flickr", "checkpoint": "best", "ciou": 0.7, "auc": 0.6}):
        run.append_metrics(record)
    run.update_meta(status="finished")
    result = CliRunner().invoke(app, ["runs", "--runs-dir", "runs"], env=WIDE)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if run.dir.name in line)
    # the best checkpoint (chosen on validation) on the first test set
    assert [cell.strip() for cell in row.strip("│┃| ").split("│")] == [
        run.dir.name, "t", "finished", "20", "-", "0.3000", "vggss (best)", "0.5000", "0.4500"]

    result = CliRunner().invoke(app, ["runs", "--runs-dir", "nothing-here"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no runs under nothing-here\n")


# --- sslt ui --------------------------------------------------------------------------------------------------------

def test_ui_with_a_server_uri_starts_nothing() -> None:
    result = CliRunner().invoke(app, ["ui"], env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", **WIDE})
    assert result.exit_code == 0
    assert result.stdout == ("MLFLOW_TRACKING_URI points at a server (http://127.0.0.1:1): open it in a browser; "
                             "nothing to start.\n")


def test_ui_runs_mlflow_ui_on_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append((cmd, kwargs.get("env") or {})))
    result = CliRunner().invoke(app, ["ui", "--port", "5123"], env={"MLFLOW_TRACKING_URI": "sqlite:///x.db", **WIDE})
    assert result.exit_code == 0, result.output
    assert [cmd for cmd, _ in calls] == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", "sqlite:///x.db",
                                          "--host", "127.0.0.1", "--port", "5123", "--workers", "1"]]
    assert calls[0][1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert result.stderr == "MLflow UI on sqlite:///x.db: http://127.0.0.1:5123  (Ctrl-C stops it)\n"


def test_ui_prints_its_url_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: None)
    uri = "sqlite:///" + "/very/long/project/folder" * 3 + "/mlflow.db"
    result = CliRunner().invoke(app, ["ui"], env={"MLFLOW_TRACKING_URI": uri, "COLUMNS": "80"})
    assert result.stderr == f"MLflow UI on {uri}: http://127.0.0.1:5000  (Ctrl-C stops it)\n"


@pytest.mark.timeout(240)
def test_ui_serves_the_runs_of_the_store(serve, tmp_path: Path, free_port: int) -> None:
    from sslt_cli.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    tracker = Tracker(experiment="ui-test", uri=uri)
    run_id = tracker.start("shown-run", params={"optim.lr": 1e-4})
    tracker.log_metrics({"val/ciou": 0.5}, step=1)
    tracker.end()
    assert run_id is not None

    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    env.update({"MLFLOW_TRACKING_URI": uri, "NO_COLOR": "1"})
    base = f"http://127.0.0.1:{free_port}"
    _, log = serve([sys.executable, "-m", "sslt_cli", "ui", "--port", str(free_port)], f"{base}/", env=env)
    assert "<html" in requests.get(f"{base}/", timeout=10).text.lower()
    found = requests.post(f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 100},
                          timeout=10).json()["experiments"]
    experiment_id = next(e["experiment_id"] for e in found if e["name"] == "ui-test")
    runs = requests.post(f"{base}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id]},
                         timeout=10).json()["runs"]
    assert [(r["info"]["run_id"], r["info"]["run_name"]) for r in runs] == [(run_id, "shown-run")]
    assert f"http://127.0.0.1:{free_port}" in log.read_text().split()


def test_export_writes_the_official_format(tmp_path: Path) -> None:
    import torch

    from sslt_cli.config import Recipe
    from sslt_cli.checkpoint import load_official_checkpoint
    from sslt_cli.model import build_model
    from sslt_cli.train import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    model = build_model()
    checkpoint = tmp_path / "last-7.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": 7, "epoch": 2,
                "recipe": recipe_dict(Recipe())}, checkpoint)
    out = tmp_path / "exported.pth.tar"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(out)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "official SSL-TIE" in result.stdout
    raw = torch.load(out, weights_only=True)
    assert (raw["epoch"], raw["iteration"], raw["optimizer"]) == (2, 7, None) and len(raw["state_dict"]) == 257
    loaded = load_official_checkpoint(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key], value)
    refused = sslt("export", str(checkpoint), "--out", str(out), "--which", "both")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--which must be best or last for an export, got 'both'" in refused.stderr


def test_eval_output_folders_follow_the_one_naming_rule(tmp_path: Path) -> None:
    from sslt_cli.cli import _recipe_set_name
    from sslt_cli.config import Recipe
    from sslt_cli.evaluate import eval_folder

    recipe = Recipe.model_validate({"data": {"root": str(tmp_path), "test": {"vggss": "test_vggss"}}})
    # a --data folder that is one of the recipe's test sets is named as training names it, by the recipe's key
    assert _recipe_set_name(recipe, tmp_path / "test_vggss") == "vggss"
    assert _recipe_set_name(recipe, tmp_path / "sub" / ".." / "test_vggss") == "vggss"
    assert _recipe_set_name(recipe, tmp_path / "elsewhere") is None
    assert _recipe_set_name(None, tmp_path / "test_vggss") is None
    assert eval_folder(tmp_path / "eval", "vggss", "best", "ezvsl") == tmp_path / "eval" / "vggss-best-ezvsl"


def test_eval_official_deviation_flags(tmp_path: Path) -> None:
    """--empty-gt zero scores a clip whose boxes clip to nothing (IoU 0, in N); --constant-maps official lets a
    negative constant map predict nothing under ssltie, as SSL-TIE's loop does; both are recorded in metrics.json."""
    boxes = {"empty": [[0.5, 0.5, -2.8823037615171176e16, 0.9]], "half": [[0.0, 0.0, 1.0, 0.5]]}
    (tmp_path / "vggss.json").write_text(json.dumps([{"file": k, "bbox": v} for k, v in boxes.items()]))
    maps = tmp_path / "maps"
    maps.mkdir()
    np.save(maps / "empty.npy", np.random.default_rng(0).random((14, 14), dtype=np.float32))
    np.save(maps / "half.npy", np.full((1, 1), -0.5, dtype=np.float32))
    base = ["eval", "--maps", str(maps), "--vggss-json", str(tmp_path / "vggss.json")]
    default = CliRunner().invoke(app, [*base, "--out", "default"], env=WIDE)
    official = CliRunner().invoke(app, [*base, "--out", "official", "--empty-gt", "zero", "--constant-maps",
                                        "official"], env=WIDE)
    assert default.exit_code == 0 and official.exit_code == 0, default.output + official.output
    assert "N = 1" in words(default.stdout) and "N = 2" in words(official.stdout)
    # the constant map: the whole frame (IoU 0.5) by default, nothing (IoU 0) as SSL-TIE's code
    assert csv_rows(Path("default/per_clip.csv"))[1][:2] == ["half", "0.5"]
    assert [row[:2] for row in csv_rows(Path("official/per_clip.csv"))[1:]] == [["empty", "0.0"], ["half", "0.0"]]
    recorded = json.loads(Path("official/metrics.json").read_text())["protocol"]
    assert (recorded["empty_gt"], recorded["constant_maps"]) == ("zero", "official")
    bad = CliRunner().invoke(app, [*base, "--empty-gt", "skip"])
    assert isinstance(bad.exception, SsltError) and bad.exception.render() == (
        "unknown empty_gt 'skip'; choose one of exclude, zero")
