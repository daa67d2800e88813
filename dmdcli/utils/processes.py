"""This process's place under `accelerate launch` (or alone), asked the same way everywhere,
and what all the processes of one command agree on."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def process_state():
    """accelerate's PartialState, on the CPU where there is no GPU. The first call fixes it for
    the process: asked without cpu=True on a GPU-less machine, a launch of N processes reports
    one, and each process would do all the work instead of its share."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def one_process_only(command: str, instead: str) -> None:
    """Refuse a command that measures on one process when launched on several (the others
    would do the whole work again, or wait on the first forever)."""
    from .errors import UserError

    if process_state().num_processes > 1:
        raise UserError(f"{command} runs in one process; under accelerate launch, {instead}")


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (so that all of them stop, or refuse, together)."""
    from accelerate.utils import reduce

    state = process_state()
    if state.num_processes == 1:
        return flag
    return bool(reduce(torch.tensor([float(flag)], device=state.device), reduction="sum").item())


@contextlib.contextmanager
def folder_in_use(folder: Path, command: str, fix: str):
    """Hold folder/.lock for the block (the main process takes it; all refuse together): a
    second command writing the same folder would interleave, or delete, the first's files.
    Refused: "FOLDER is in use by another COMMAND (process PID); FIX", COMMAND being the
    holder's. Where the filesystem has no locks (flock unsupported, no fcntl), it warns and
    goes on unlocked; where the folder cannot be made (a file there), it refuses."""
    import errno
    import warnings

    from .errors import UserError
    from .io import try_lock

    folder = Path(folder)
    main = process_state().is_main_process
    lock, problem = None, None
    if main:
        try:
            lock = try_lock(folder, command)
            problem = None if lock else "busy"
        except ImportError:
            warnings.warn(f"no file locks on this platform: nothing stops a second command writing {folder}")
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                warnings.warn(f"{folder}'s filesystem has no file locks ({e.strerror}): nothing stops a second "
                              f"command writing it")
            elif e.errno in (errno.EEXIST, errno.ENOTDIR):
                problem = f"{folder} is a file or under one, not a folder; choose another --out"
            else:
                raise
    if any_process(problem is not None):
        if problem == "busy":
            pid, holder = _holder(folder)
            problem = f"{folder} is in use by another {holder or command} (process {pid}); {fix}"
        raise UserError(problem or f"{folder}: refused by the main process (its message says why)")
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def _holder(folder: Path) -> tuple[str, str]:
    """(pid, command) written in folder/.lock by the process holding it; '?' where unreadable."""
    try:
        pid, _, command = (folder / ".lock").read_text().strip().partition(" ")
    except OSError:
        return "?", ""
    return pid or "?", command
