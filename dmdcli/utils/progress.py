"""The progress display every long command shares: a rich bar with rate and ETA on a
terminal. Where rich draws no live bar (output to a file: nohup, a batch scheduler, CI), the
same tasks print plain lines instead: as they advance, at most one every PLAIN_EVERY seconds,
one when they complete, and one where they stopped, so a log file shows how far a run is
and when it will end."""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

PLAIN_EVERY = 30.0   # seconds between plain lines of one task


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "-/s", style="cyan")


def plain_line(description: str, completed: float, total: float | None, start_completed: float,
               seconds: float, fields: dict) -> str:
    """One task's state as a line of text; the rate counts from where this process started
    it (a resumed run's first step), so the ETA is this run's."""
    rate = (completed - start_completed) / seconds if seconds > 0 else 0.0
    eta = "-"
    if rate > 0 and total is not None:
        h, rest = divmod(round((total - completed) / rate), 3600)
        eta = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"   # hours past 24 stay hours
    extra = "  ".join(str(v) for v in fields.values() if str(v))
    return (f"{description} {int(completed)}/{'?' if total is None else int(total)}  {rate:.2f}/s  eta {eta}"
            + (f"  {extra}" if extra else ""))


class PlainLogProgress(Progress):
    """rich's Progress, plus plain lines where the console is not interactive."""

    def __init__(self, *columns, every: float | None = None, quiet: bool = False, **kwargs):
        super().__init__(*columns, disable=quiet, **kwargs)
        # Plain: the lines are the display. rich's own last frame, squeezed into a file's 80
        # columns, would add a line of ellipses. Quiet (another process than the main one): nothing.
        self.plain = not quiet and not (self.console.is_interactive or self.console.is_jupyter)
        self.disable = quiet or self.plain
        self.every = PLAIN_EVERY if every is None else every
        self._plain_state: dict = {}   # task id: (start time, start completed, last print time, last completed)

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        now, completed = self.get_time(), self._tasks[task_id].completed
        self._plain_state[task_id] = (now, completed, now, completed)
        return task_id

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def stop(self) -> None:
        """Leaving the display (done, an error, a clean stop on a signal): a task that moved
        since its last plain line gets one more, so a log ends where the work stopped."""
        for task_id in list(self._plain_state):
            self._maybe_print(task_id, final=True)
        super().stop()

    def _maybe_print(self, task_id, final: bool = False) -> None:
        if not self.plain or task_id not in self._plain_state:
            return
        task = self._tasks[task_id]
        t0, c0, last_time, last_completed = self._plain_state[task_id]
        now, done = self.get_time(), task.total is not None and task.completed >= task.total
        if task.completed == last_completed or not (final or done or now - last_time >= self.every):
            return
        self._plain_state[task_id] = (t0, c0, now, task.completed)
        self.console.print(plain_line(task.description, task.completed, task.total, c0, now - t0, task.fields),
                           markup=False, highlight=False)


def progress_bar(console, extra: str = "", every: float | None = None, quiet: bool = False) -> Progress:
    """The bar: description, bar, done/total, rate, elapsed, ETA, and `extra` (a format of
    the task's fields, e.g. "{task.fields[losses]}"). quiet: show nothing (for the processes
    other than the main one under accelerate launch, whose terminal it shares)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    return PlainLogProgress(*columns, console=console, transient=False, every=every, quiet=quiet)
