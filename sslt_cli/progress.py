"""Rich progress-bar pieces shared by every long command (prepare, eval, retrieve)."""
from __future__ import annotations

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
