"""The shared progress display: plain lines where no live bar can be drawn (a log file)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dmdcli.utils.progress import plain_line, progress_bar


def test_plain_line_rate_counts_from_where_this_process_started_and_hours_pass_a_day():
    assert plain_line("distill", 15, 20, 10, 5.0, {"losses": "dm 1.0000"}) == \
        "distill 15/20  1.00/s  eta 00:00:05  dm 1.0000"
    assert plain_line("pairs", 1, 100001, 0, 1.0, {}) == "pairs 1/100001  1.00/s  eta 27:46:40"
    assert plain_line("student", 0, 10, 0, 0.0, {"losses": ""}) == "student 0/10  0.00/s  eta -"
    assert plain_line("pairs", 1234567, 2000000, 1234566, 1.0, {}) == "pairs 1234567/2000000  1.00/s  eta 212:37:13"


def _file_bar(every, clock):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, force_interactive=False, width=200)
    bar = progress_bar(console, every=every)
    bar.get_time = lambda: clock[0]   # rich reads its clock through get_time
    return bar, out


def test_a_file_gets_a_line_every_so_often_and_one_at_the_end():
    clock = [100.0]
    bar, out = _file_bar(30.0, clock)
    with bar:
        task = bar.add_task("pairs", total=100, completed=40)   # resumed: 40 done before this process
        for _ in range(6):
            clock[0] += 10.0
            bar.advance(task, 10)
    # 30 s after the start (70 done: 1 a second) and at the end (100 done at 60 s); no bar frame
    assert out.getvalue().splitlines() == ["pairs 70/100  1.00/s  eta 00:00:30", "pairs 100/100  1.00/s  eta 00:00:00"]


def test_a_file_gets_a_last_line_where_the_work_stopped():
    clock = [0.0]
    bar, out = _file_bar(30.0, clock)
    with pytest.raises(KeyboardInterrupt), bar:
        task = bar.add_task("distill", total=100)
        clock[0] += 10.0
        bar.advance(task, 20)       # 10 s in: too soon for a plain line
        raise KeyboardInterrupt     # the clean stop's exception, leaving the display
    assert out.getvalue().splitlines() == ["distill 20/100  2.00/s  eta 00:00:40"]
    done, out = _file_bar(30.0, clock)
    with done:
        task = done.add_task("pairs", total=10)
        clock[0] += 5.0
        done.advance(task, 10)      # its completion line; leaving adds nothing
    assert out.getvalue().splitlines() == ["pairs 10/10  2.00/s  eta 00:00:00"]


def test_a_terminal_gets_the_live_bar_and_no_plain_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, force_interactive=True, width=200)
    with progress_bar(console, every=0.0) as bar:
        task = bar.add_task("pairs", total=3)
        for _ in range(3):
            bar.advance(task)
    assert "pairs 3/3  " not in out.getvalue()
    assert "3/3" in out.getvalue()   # the bar's own MofN column


def test_a_quiet_bar_shows_nothing_on_a_terminal_or_in_a_file():
    """Under accelerate launch the other processes get a quiet bar: their empty live display
    would erase the main process's line on the terminal they share."""
    for interactive in (True, False):
        out = io.StringIO()
        console = Console(file=out, force_terminal=interactive, force_interactive=interactive, width=200)
        with progress_bar(console, every=0.0, quiet=True) as bar:
            task = bar.add_task("pairs", total=3)
            for _ in range(3):
                bar.advance(task)
        assert out.getvalue() == ""
