"""Stopping on SIGINT (Ctrl-C) and SIGTERM (a scheduler) in every phase of a command that owns a run.

One :class:`StopListener` is installed for the whole command (``sslt train``, ``sslt ablate``; :func:`listening`),
and the code names the phase it is in (:meth:`StopListener.phase`). In a phase that can stop at a safe point
(training steps, validation: ``defer=True``) a signal is only noted: the phase finishes its step (or its validation)
and the caller checkpoints and stops. In every other phase (setup, the final evaluation, retrieval) the signal raises
:class:`Interrupted` at once; it is a ``KeyboardInterrupt``, so whoever owns the run records it as interrupted and
closes its MLflow run ``KILLED``. A second signal during a deferring phase raises at once too. Either way the command
exits with :data:`EXIT_CODE` (130), the run's ``meta.json`` says ``interrupted`` and in which phase, and the command
that continues it is printed.

Test hook (documented in README, "Reliability"): with ``SSLT_TEST_HOLD_PHASE=<phase>`` and
``SSLT_TEST_HOLD_FILE=<path>`` in the environment, entering that phase writes ``<path>`` and waits there until a
signal arrives (at most :data:`HOLD_LIMIT_S` seconds, then goes on). It lets a test send a signal in a given phase
without racing it; it changes no result (it only waits), and nothing happens without both variables.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Iterator

EXIT_CODE = 130
HOLD_PHASE_ENV = "SSLT_TEST_HOLD_PHASE"
HOLD_FILE_ENV = "SSLT_TEST_HOLD_FILE"
HOLD_LIMIT_S = 120.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked by ``signum`` (SIGINT or SIGTERM) in ``phase``."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"{signal.Signals(signum).name} in {phase}")
        self.signum, self.phase = signum, phase

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopListener:
    """SIGINT / SIGTERM for one command: the current phase, whether it defers a stop, and the signal received."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.current = "setup"
        self.deferring = False
        self.heard_in: str | None = None  # the phase the first signal arrived in

    @property
    def requested(self) -> bool:
        """Whether a signal arrived (a deferring phase stops at its next safe point)."""
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __call__(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            self.heard_in = self.current
        if not (self.deferring and first):
            raise Interrupted(signum, self.current)

    @contextlib.contextmanager
    def phase(self, name: str, *, defer: bool = False) -> Iterator["StopListener"]:
        """Run the ``with`` block as phase ``name``; ``defer``: a first signal is noted, not raised. A signal noted
        before a raising phase starts raises as it starts."""
        before = (self.current, self.deferring)
        self.current, self.deferring = name, defer
        try:
            if self.signum is not None and not defer:
                raise Interrupted(self.signum, name)
            self._hold_for_test(name)
            yield self
        finally:
            self.current, self.deferring = before

    def _hold_for_test(self, name: str) -> None:
        """The documented test hook of the module docstring: nothing unless both variables are set for ``name``."""
        hold_file = os.environ.get(HOLD_FILE_ENV)
        if os.environ.get(HOLD_PHASE_ENV) != name or not hold_file:
            return
        Path(hold_file).write_text(f"{os.getpid()} {name}\n")
        end = time.monotonic() + HOLD_LIMIT_S
        while self.signum is None and time.monotonic() < end:
            time.sleep(0.05)


_active: StopListener | None = None


@contextlib.contextmanager
def listening() -> Iterator[StopListener]:
    """The command's :class:`StopListener`, installed for SIGINT and SIGTERM while the block runs (the handlers that
    were there are restored after); inside another ``listening`` block, that block's listener. Off the main thread
    (where Python cannot install handlers) a listener that never hears a signal."""
    global _active
    if _active is not None:
        yield _active
        return
    listener = StopListener()
    previous = {}
    for sig in SIGNALS:
        try:
            previous[sig] = signal.signal(sig, listener)
        except ValueError:  # not the main thread
            pass
    _active = listener
    try:
        yield listener
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
