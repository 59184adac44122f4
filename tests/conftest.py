"""Shared fixtures.

Every test runs with its own empty folder as the working directory and ``MLFLOW_TRACKING_URI`` pointing at a sqlite
file inside it, so no test writes ``runs/``, ``mlflow.db`` or ``mlruns/`` into the repository (MLflow puts artifacts
under ``./mlruns`` of the working directory). Refer to repository files through the ``repo_root`` fixture.
"""
from __future__ import annotations

import socket
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
