"""Progress display for long work (passes, calibration, validation), on stderr when it is a terminal."""

from __future__ import annotations

import sys


class Progress:
    """Interface the runner and analyses report to; this base shows nothing."""

    def add(self, label: str, total: int | None = None):
        return None

    def advance(self, task, amount: int = 1) -> None:
        pass

    def done(self, task) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress(Progress):
    """A rich progress display on stderr; transient so the report table follows cleanly."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as _Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = _Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._progress.start()

    def add(self, label: str, total: int | None = None):
        return self._progress.add_task(label, total=total)

    def advance(self, task, amount: int = 1) -> None:
        if task is not None:
            self._progress.advance(task, amount)

    def done(self, task) -> None:
        if task is not None:
            self._progress.remove_task(task)

    def close(self) -> None:
        self._progress.stop()


def make_progress(enabled: bool | None = None) -> Progress:
    """A rich display when stderr is a terminal (or when forced), else a silent one."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return RichProgress() if enabled else Progress()
