"""Shared fixtures.

Every test runs with its own empty folder as the working directory and ``MLFLOW_TRACKING_URI`` pointing at a sqlite
file inside it, so no test writes ``runs/``, ``mlflow.db`` or ``mlruns/`` into the repository (MLflow puts artifacts
under ``./mlruns`` of the working directory). Refer to repository files through the ``repo_root`` fixture.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's tmp_path, made the working directory, with a private sqlite tracking store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def repo_root() -> Path:
    """The repository's root folder (tests run elsewhere, see ``isolated_workdir``)."""
    return REPO_ROOT


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve(tmp_path: Path):
    """Start a server command in its own process group and wait until ``url`` answers HTTP 200.

    Call as ``serve(cmd, url, env=None)``; returns the Popen and the path of its combined stdout/stderr log. Every
    server started is stopped at teardown with its whole process group (MLflow starts worker processes), pass or fail.
    """
    import requests

    started: list[subprocess.Popen] = []

    def start(cmd: list[str], url: str, env: dict[str, str] | None = None,
              deadline_s: float = 180) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"server-{len(started)}.log"
        # no background job runners: the tests need the tracking API only, and the runners cost seconds of CPU
        env = {**(env if env is not None else os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log, "wb") as sink:
            process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                       start_new_session=True)
        started.append(process)
        end = time.monotonic() + deadline_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"{cmd} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(f"{url} did not answer within {deadline_s} s:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return process, log
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.3)

    yield start
    for process in started:
        _stop_process_group(process)


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group, give it 15 s, then SIGKILL whatever is left of it (orphaned workers included)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=15)


def _write_noise_clips(folder: Path, ids, size: int, seed: int) -> dict:
    """One clip per id in ``folder``: a (size, size) JPEG of random pixels and 3 s of 16 kHz uniform noise."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from sslt_cli.data.manifest import Clip

    rng = np.random.default_rng(seed)
    clips = {}
    for cid in ids:
        frame, audio = folder / f"{cid}.jpg", folder / f"{cid}.wav"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(frame)
        sf.write(audio, rng.uniform(-0.5, 0.5, 16000 * 3).astype(np.float32), 16000)
        clips[cid] = Clip(cid, frame=str(frame), audio=str(audio))
    return clips


@pytest.fixture(scope="session")
def write_noise_clips():
    """``write_noise_clips(folder, ids, size, seed) -> {id: Clip}``: random frames with noise audio, for model tests."""
    return _write_noise_clips


def _lock(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only folder")


def _unlock(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


@pytest.fixture
def make_read_only():
    """``make_read_only(folder)``: nobody can add, remove or rename an entry of ``folder`` until the test ends
    (``chmod 555`` for a user, ``chattr +i`` for root, who ignores permission bits; skipped where neither works)."""
    locked: list[Path] = []

    def lock(folder: Path) -> Path:
        _lock(folder)
        locked.append(folder)
        return folder

    yield lock
    for folder in reversed(locked):
        _unlock(folder)
