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
