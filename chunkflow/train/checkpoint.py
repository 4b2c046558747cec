"""Checkpoints in megatron-core's distributed format (resharding-capable), plus the
trainer's own small state (step, LR schedule, data loader position) as JSON.

Layout of ``<dir>``::

    model/        megatron dist_checkpointing shards of the model (and optimizer)
    trainer.json  {"step": ..., "scheduler": {...}, "loader": {...}, "config": {...}}

Loading a directory written with another tensor/pipeline layout works for the model
(megatron reshards on load); optimizer state is restored only with the same layout.
A ``trainer.json`` with ``"model_only": true`` (a converted Hugging Face model, see
``chunkflow.hf_convert``) holds weights only: optimizer, LR schedule and data
position then start fresh. A model with LoRA adapters (``lora.enabled``) loading a
checkpoint without adapters takes its base weights only, the same way (step 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

__all__ = ["save_checkpoint", "load_checkpoint", "read_trainer_state"]


def _model_sd(model: Any) -> dict:
    module = getattr(model, "module", model)
    return module.sharded_state_dict(prefix="")


def save_checkpoint(
    path: str | Path,
    *,
    model: Any,
    optimizer: Optional[Any],
    trainer_state: dict,
    rank: int,
) -> None:
    path = Path(path)
    if rank == 0:
        (path / "model").mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    sd: dict[str, Any] = {"model": _model_sd(model)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"])
    dist_checkpointing.save(sd, str(path / "model"))
    if rank == 0:
        (path / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    if dist.is_initialized():
        dist.barrier()


def read_trainer_state(path: str | Path) -> dict:
    p = Path(path) / "trainer.json"
    if not p.is_file():
        raise FileNotFoundError(f"train.load={path}: no trainer.json (not a chunkflow checkpoint)")
    return json.loads(p.read_text())


def _saved_keys(model_dir: Path) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata)


def load_checkpoint(path: str | Path, *, model: Any, optimizer: Optional[Any]) -> dict:
    """Load model (and optimizer) state in place; return the trainer state dict."""
    path = Path(path)
    state = read_trainer_state(path)
    sd: dict[str, Any] = {"model": _model_sd(model)}
    adapters = [getattr(v, "key", k) for k, v in sd["model"].items() if ".lora_" in k]
    if adapters and adapters[0] not in _saved_keys(path / "model"):  # a base model for LoRA
        sd["model"] = {k: v for k, v in sd["model"].items() if ".lora_" not in k}
        state = {**state, "model_only": True, "step": 0}
    if state.get("model_only"):  # written by import_hf: no optimizer state to restore
        optimizer = None
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=True)
    loaded = dist_checkpointing.load(sd, str(path / "model"))
    module = getattr(model, "module", model)
    module.load_state_dict(loaded["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return state
