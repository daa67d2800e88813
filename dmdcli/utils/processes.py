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


def main_says(text: str) -> str:
    """The main process's `text` on every process, sent as bytes (nothing is pickled)."""
    state = process_state()
    if state.num_processes == 1:
        return text
    from accelerate.utils import broadcast

    raw = text.encode() if state.is_main_process else b""
    size = broadcast(torch.tensor([len(raw)], device=state.device)).item()
    data = torch.zeros(size, dtype=torch.uint8, device=state.device)
    if state.is_main_process and size:
        data = torch.tensor(list(raw), dtype=torch.uint8, device=state.device)
    return bytes(broadcast(data).cpu().tolist()).decode() if size else ""


def check_shared(folder: Path) -> None:
    """Refuse, on every process together, a folder that is not one folder for all of them:
    the main process writes checkpoints (or a manifest) that the others read, and they write
    files it reads. Several nodes each with its own disk at the same path would fail later,
    mid-run, with a file not found on one node."""
    import secrets

    from .errors import UserError
    from .io import write_text

    state = process_state()
    if state.num_processes == 1:
        return
    probe = Path(folder) / ".shared-check"
    token = main_says(secrets.token_hex(16) if state.is_main_process else "")
    if state.is_main_process:
        write_text(probe, token)
    state.wait_for_everyone()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    unseen = any_process(not seen)
    state.wait_for_everyone()
    if state.is_main_process:
        probe.unlink(missing_ok=True)
    if unseen:
        raise UserError(f"{folder} is not one folder for all {state.num_processes} processes: some do not see what "
                        f"process 0 writes there (a local disk on each node?); put it on a file system that "
                        f"every node shares (NFS, Lustre, a mounted bucket)")


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
        check_shared(folder)
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
