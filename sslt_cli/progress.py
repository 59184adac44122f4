"""Rich progress-bar pieces shared by every long command (prepare, eval, retrieve)."""
from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second: the recent rate while the task runs, the rate it had when its last item arrived once it has
    finished (rich's ``finished_speed``), and ``-`` until rich has measured anything. ``unit`` names the items
    (``clips/s``); empty gives ``/s``. ``average_when_finished``: a finished task without a measured rate (one ended
    by lowering its total to what was done) shows its average over its whole life instead; leave it off for bars
    whose tasks are all created up front and wait for their turn, whose life average would count the waiting."""

    def __init__(self, unit: str = "clips", average_when_finished: bool = False) -> None:
        super().__init__()
        self.suffix = f" {unit}/s" if unit else "/s"
        self.average_when_finished = average_when_finished

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and self.average_when_finished and task.finished and task.finished_time:
            speed = task.completed / task.finished_time
        return Text(f"{speed:.1f}{self.suffix}" if speed else f"-{self.suffix}")


class ClipProgress:
    """A rich progress bar on ``console`` (clips done, clips/s, ETA) for at most ``total`` clips; as a context manager
    it gives the callback that advances it by n clips (what an evaluation's ``progress`` takes).

    Clips dropped on the way (a decode error, an empty ground truth) never advance it, so on a normal exit the total
    becomes the count done and the finished bar is full; what was dropped is reported with N.
    """

    def __init__(self, console: Console, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # the total is lowered to the clips done at the end (dropped clips never advance it): average when finished
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            RateColumn(average_when_finished=True), TextColumn("ETA"), TimeRemainingColumn(),
                            console=console)
        self.description, self.total = description, total

    def __enter__(self) -> Callable[[int], None]:
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, kind, *exc) -> bool | None:
        if kind is None:
            (task,) = self.bar.tasks
            self.bar.update(self.task, total=task.completed)
        return self.bar.__exit__(kind, *exc)


class StepBars:
    """Rich bars on ``console`` for a command whose steps report absolute counts: ``update(what, done, total)`` makes
    a bar the first time ``what`` is seen (``embed clips``, ``rank a2a``) and sets it to ``done`` of ``total``. Use it
    as a context manager around the work."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 RateColumn(unit=""), TimeRemainingColumn(), console=console)
        self.bars: dict[str, int] = {}

    def __enter__(self) -> "StepBars":
        self.progress.__enter__()
        return self

    def __exit__(self, kind, *exc) -> bool | None:
        return self.progress.__exit__(kind, *exc)

    def update(self, what: str, done: int, total: int) -> None:
        if what not in self.bars:
            self.bars[what] = self.progress.add_task(what, total=total)
        self.progress.update(self.bars[what], completed=done)
