"""Worker processes that end with the process that started them.

``kill -9`` of ``sslt prepare`` gives its pool no chance to stop its workers; without a check they keep decoding (and
multiprocessing's resource tracker, which exits only when every process holding its pipe is gone, keeps running
too), orphaned. Each worker therefore watches its parent and exits as soon as it is gone.
"""
from __future__ import annotations

import os
import threading
import time

PARENT_POLL_S = 0.5


def die_with_parent(parent: int) -> None:
    """Worker initializer: start a daemon thread that ends this process (``os._exit``, no cleanup to wait for) once
    its parent process ``parent`` (the pid the parent passes, ``os.getpid()``) is gone.

    A reparented process sees a new parent id (init or a subreaper), which is what the thread polls for, every
    PARENT_POLL_S seconds. The parent's pid is passed rather than read here: a parent killed while the worker was
    still starting would otherwise leave it watching its new parent.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="sslt-parent-watch", daemon=True).start()
