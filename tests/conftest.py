import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs `pytest -n auto`: the workers share the cores, each with its share of threads,
    # and so do the processes a worker starts (OMP_NUM_THREADS is read by torch in each of them).
    import torch

    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


# Modules with tests of a minute or more (`make test` lists the slowest): collected first, so that
# the workers of `pytest -n` start on them and finish together, not one waiting on the last.
LONG_FIRST = ("test_sharding", "test_toy2d", "test_demo", "test_fault_injection", "test_multiprocess",
              "test_compare", "test_edm", "test_shipped_teacher", "test_resume", "test_signals")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: the rest keep their order


def free_port() -> int:
    """A free local port, so that process groups of parallel test workers do not meet."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(*args, processes: int = 2) -> list[str]:
    """`accelerate launch` of `dmd ARGS` on `processes` CPU processes (DDP over gloo), on a free port
    so that launches in parallel test workers do not meet on accelerate's default 29500."""
    port = free_port()
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "dmdcli", *map(str, args)]


def launch_env() -> dict:
    """The environment of a launched run: offline, quiet, one thread a process."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run_dmd(*args, cwd=None, timeout=600):
    """Run `python -m dmdcli` in a subprocess; returns CompletedProcess with text output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dmdcli", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def dmd_here(*args):
    """`dmd ARGS` in this process, returning what run_dmd returns: no interpreter start-up and
    imports (about 5 s a call on 2 cores). For workflow steps whose process isolation is not what
    the test is about; kills, signals, launches and pickles keep run_dmd."""
    import contextlib
    import io
    import warnings

    from dmdcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # as PYTHONWARNINGS=ignore does for run_dmd
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["dmd", *map(str, args)], code, out.getvalue(), err.getvalue())


TINY = """
[run]
out = "{out}"
seed = 0
checkpoint_every = {checkpoint_every}
log_every = 10
preview_samples = 0

[teacher]
name = "gmm"

[teacher.gmm]
hidden = 32
layers = 2

[train]
method = "{method}"
steps = {steps}
batch_size = 64
critic_steps_per_generator_step = 2
critic_warmup_steps = 4
lr_generator = 1e-3
lr_critic = 1e-3
warmup_steps = 5
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny toy recipe; returns its path. Keyword arguments fill the template."""
    def make(name="tiny", out=None, steps=40, checkpoint_every=20, method="dmd2", extra=""):
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY.format(out=out or tmp_path / "runs" / name, steps=steps,
                                    checkpoint_every=checkpoint_every, method=method) + extra)
        return path
    return make
