import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


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
