"""Checkpoints in megatron-core's distributed format (resharding-capable), plus the
trainer's own small state (step, LR schedule, data loader position) as JSON and each
rank's random-number state.

Layout of ``<dir>``::

    model/           megatron dist_checkpointing shards of the model (and optimizer)
    trainer.json     {"step": ..., "scheduler": {...}, "loader": {...}, "config": {...}}
    rng/rank{N}.pt   rank N's generators: {"world_size", "cpu", "cuda", "tracker"}

Loading a directory written with another tensor/pipeline layout works for the model
(megatron reshards on load). Optimizer state: the plain optimizer restores only with
the same layout; the distributed optimizer (``train.distributed_optimizer``) is saved in
megatron's ``fully_reshardable`` form (each parameter's Adam moments as whole tensors,
gathered on DP rank 0 at save time), which loads into any TP/PP/DP layout. (The other
accepted form, ``dp_reshardable``, saves each rank's flat buffer without a gather but
reshards only along DP; megatron's default, ``fully_sharded_model_space``, fails
validation with "flattened_range is not supported" in 0.16 and 0.19.)

Random state: every rank saves torch's CPU generator, its CUDA generator (if any) and
megatron's model-parallel tracker streams (``get_cuda_rng_tracker().get_states()``:
the TP-distinct dropout streams), and restores them on load, so dropout after a resume
draws what the uninterrupted run drew. They are restored only if the world size is
unchanged (rank N's streams mean nothing to another layout); otherwise, or for a
checkpoint without ``rng/``, the run continues from the seeds ``init_distributed`` set,
and says so.

A ``trainer.json`` with ``"model_only": true`` (a converted Hugging Face model, see
``chunkflow.hf_convert``) holds weights only: optimizer, LR schedule and data
position then start fresh. A model with LoRA adapters (``lora.enabled``) loading a
checkpoint without adapters takes its base weights only, the same way (step 0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from chunkflow.parallel import comm

__all__ = ["save_checkpoint", "load_checkpoint", "read_trainer_state", "latest_checkpoint", "rng_state", "set_rng_state",
           "OPTIMIZER_METADATA"]

logger = logging.getLogger(__name__)

# How the distributed optimizer lays its state out in the checkpoint (see module doc);
# ignored by the plain optimizer.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_sd(model: Any) -> dict:
    module = getattr(model, "module", model)
    return module.sharded_state_dict(prefix="")


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rng_state() -> dict:
    """This rank's generators: torch CPU, CUDA (current device) and megatron's tracker."""
    return {
        "world_size": _world()[1],
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    path: str | Path,
    *,
    model: Any,
    optimizer: Optional[Any],
    trainer_state: dict,
    rank: int,
) -> None:
    path = Path(path)
    rng = rng_state()  # before anything below could draw
    if rank == 0:
        (path / "model").mkdir(parents=True, exist_ok=True)
        (path / "rng").mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        comm.barrier()
    torch.save(rng, path / "rng" / f"rank{_world()[0]}.pt")
    sd: dict[str, Any] = {"model": _model_sd(model)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(sd, str(path / "model"))
    if rank == 0:
        (path / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    if dist.is_initialized():
        comm.barrier()


def read_trainer_state(path: str | Path) -> dict:
    p = Path(path) / "trainer.json"
    if not p.is_file():
        raise FileNotFoundError(f"train.load={path}: no trainer.json (not a chunkflow checkpoint)")
    return json.loads(p.read_text())


def _saved_keys(model_dir: Path) -> set:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata)


def _restore_rng(path: Path) -> bool:
    rank, world = _world()
    f = path / "rng" / f"rank{rank}.pt"
    if not f.is_file():
        logger.warning("%s has no rng/rank%d.pt: random state continues from the run's seed", path, rank)
        return False
    state = torch.load(f, weights_only=False)
    if state["world_size"] != world:
        logger.warning("%s was saved by %d ranks, this run has %d: random state continues from the "
                       "run's seed", path, state["world_size"], world)
        return False
    set_rng_state(state)
    return True


def _torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a megatron (chained) optimizer: megatron's
    fallback when neither transformer-engine nor apex is installed."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(p, "optimizer", None) for p in parts]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def _init_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam the state its first step would create (zeros, step 0).

    With the torch fallback, megatron's ``DistributedOptimizer.state_dict()`` reads
    each parameter's ``'step'`` and asserts there is exactly one value; a freshly built
    optimizer has none, so asking it for the state dict to load into fails. The
    values are overwritten by the load.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if p not in adam.state:
                    adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


def _unshare_adam_steps(optimizer: Any) -> None:
    """megatron's load gives every parameter the *same* ``'step'`` tensor; torch Adam
    increments each parameter's step in place, so a shared one would advance once per
    parameter per step. One tensor each, as a run that never stopped has."""
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def load_checkpoint(path: str | Path, *, model: Any, optimizer: Optional[Any]) -> dict:
    """Load model (and optimizer) state in place and restore this rank's random state
    (see module doc); return the trainer state dict."""
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
        _init_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(sd, str(path / "model"))
    module = getattr(model, "module", model)
    module.load_state_dict(loaded["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if not state.get("model_only"):
        state = {**state, "rng_restored": _restore_rng(path)}
    return state


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The checkpoint under ``output_dir`` with the highest step (``train.load: auto``),
    or None when there is none. Directories without a readable ``trainer.json`` (a save
    that did not finish) are passed over."""
    best: Optional[tuple[int, float, Path]] = None
    root = Path(output_dir)
    if not root.is_dir():
        return None
    for d in root.iterdir():
        if not (d.is_dir() and d.name.startswith("checkpoint")):
            continue
        try:
            step = int(read_trainer_state(d)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        key = (step, (d / "trainer.json").stat().st_mtime, d)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
