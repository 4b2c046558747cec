"""Random state a forward draws from, taken and replayed.

A chunk whose forward ran without keeping its graph is rebuilt later (``Recompute``); it
must draw the same random numbers (dropout, e.g. LoRA's) as its first forward::

    state = rng_state(device)            # before the first forward
    with replayed_rng(state, device):    # around the recompute
        ...

``None`` as the state replays nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["rng_state", "set_rng_state", "replayed_rng"]


def rng_state(device: torch.device) -> tuple:
    """Every random state a forward may draw from: torch's CPU and device generators, and
    megatron's model-parallel tracker (used by dropout inside tensor-parallel regions)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    tracker = None
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - no tracker (megatron not initialised): nothing to replay
        tracker = None
    return torch.get_rng_state(), cuda, tracker


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Install a state taken by :func:`rng_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    if state[2] is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state[2])


@contextlib.contextmanager
def replayed_rng(state: Optional[tuple], device: torch.device) -> Iterator[None]:
    """Run with the random state ``state`` (from :func:`rng_state`), then restore the current one."""
    if state is None:
        yield
        return
    now = rng_state(device)
    try:
        set_rng_state(state, device)
        yield
    finally:
        set_rng_state(now, device)
