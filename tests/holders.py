"""Processes that hold a folder (``sslt_cli.folder_lock``) for tests of the processes they keep out."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HOLD = """
import sys, time
from sslt_cli.folder_lock import hold
with hold(sys.argv[1], "run folder", command=sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""
# flock without a record: a holder caught between taking the lock and writing who it is
LOCK_ONLY = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def start_holder(folder: Path, code: str = HOLD, command: str = "sslt train --resume x") -> subprocess.Popen:
    """A process holding ``folder`` until it is killed (it prints 'held' once it does)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, env=env,
                               text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
