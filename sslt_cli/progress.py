"""Rich progress-bar pieces shared by every long command (prepare, eval, retrieve)."""
from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second: the recent rate while the task runs, the whole task's average once it has finished, and
    ``-`` until rich has measured anything. ``unit`` names the items (``clips/s``); empty gives ``/s``."""

    def __init__(self, unit: str = "clips") -> None:
        super().__init__()
        self.suffix = f" {unit}/s" if unit else "/s"

    def render(self, task: Task) -> Text:
        speed = task.completed / task.finished_time if task.finished and task.finished_time else task.speed
        return Text(f"{speed:.1f}{self.suffix}" if speed else f"-{self.suffix}")
