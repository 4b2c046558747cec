"""Shared fixtures: deterministic samples for model-level tests."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import tests/_workers.py


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
