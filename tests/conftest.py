"""Shared fixtures: deterministic samples for model-level tests."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import tests/_workers.py

# Strict device rule for the whole suite (chunkflow/parallel/comm.py): every
# torch.distributed collective and p2p call checks that its tensors are on a device the
# group's backend takes. Set in the environment so spawned ranks and torchrun children
# inherit it (run_distributed and init_distributed install the checks there), and
# installed in this process for in-process tests.
os.environ["CHUNKFLOW_STRICT_DEVICES"] = "1"
from chunkflow.parallel.comm import install_strict_checks  # noqa: E402

install_strict_checks()


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def reference_of():
    """``reference_of(lengths, seed)``: the world-size-1 Megatron-path loss, gradients and
    weights (tests/_workers.py ``full_reference``) for ``make_samples(lengths, seed)``,
    computed once per session. Several layout tests compare against the same reference;
    each computation is a process start and a model build."""
    from _workers import full_reference, make_samples

    from chunkflow.parallel.spawn import run_distributed

    cache: dict = {}

    def get(lengths, seed: int) -> dict:
        key = (tuple(lengths), seed)
        if key not in cache:
            cache[key] = run_distributed(full_reference, 1, ([], make_samples(list(lengths), seed=seed)))[0]
        return cache[key]

    return get


_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launch_env_unchanged(request):
    """A test (or the library code it calls) that leaves torchrun's variables set in this
    process fails: later launches (torchrun, sbatch) would inherit a stale rendezvous.
    The variables are restored either way, so one leak does not spread."""
    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    yield
    after = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    if after != before:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        changed = {k: (before[k], after[k]) for k in _LAUNCH_ENV if before[k] != after[k]}
        pytest.fail(f"{request.node.nodeid} left launch variables changed: {changed}", pytrace=False)
