"""Stopping long work cleanly: the first SIGINT/SIGTERM asks the loop to finish its current
step, write a checkpoint and exit; a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading


class Stopped(Exception):
    """Raised after a clean stop; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:           # the second signal: default action, at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None
