"""This process's place under `accelerate launch` (or alone), asked the same way everywhere."""

from __future__ import annotations

import torch


def process_state():
    """accelerate's PartialState, on the CPU where there is no GPU. The first call fixes it for
    the process: asked without cpu=True on a GPU-less machine, a launch of N processes reports
    one, and each process would do all the work instead of its share."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
