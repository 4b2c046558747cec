"""Checkpoints in megatron-core's distributed format (resharding-capable), plus the
trainer's own small state (step, LR schedule, data loader position) as JSON and each
rank's random-number state.

Layout of ``<output_dir>``::

    checkpoint_step<N>/  one complete checkpoint per saved step:
      model/             megatron dist_checkpointing shards of the model (and optimizer)
      trainer.json       {"step": ..., "scheduler": {...}, "loader": {...}, "config": {...}}
      rng/rank{N}.pt     rank N's generators: {"world_size", "cpu", "cuda", "tracker"}
      adapter/           LoRA adapters on their own (lora.enabled)
      manifest.json      every other file's size and hash (checkpoint_files.py), written last
    latest               the name of the newest checkpoint this run saved

Saving is atomic: every rank writes into ``.tmp-checkpoint_step<N>-<nonce>`` (rank 0
draws the nonce and broadcasts it), the ranks hash the files between them and rank 0
writes the manifest; after a barrier rank 0 renames the directory to its name (an
existing one of that name is first renamed aside to ``.old-...`` and deleted after),
then rewrites ``latest``. A kill at any moment leaves every named checkpoint complete.
Loading verifies the manifest (every file's hash) before reading anything and refuses
an incomplete or corrupt checkpoint, naming the newest valid one.

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
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from chunkflow.parallel import comm
from chunkflow.train.checkpoint_files import (
    CheckpointError, check_pickled_objects, check_sizes, hash_files, list_files, read_dcp_metadata,
    read_manifest, verify_files, write_manifest_entries, write_text_atomic,
)

__all__ = ["save_checkpoint", "load_checkpoint", "read_trainer_state", "latest_checkpoint", "prune_checkpoints",
           "verify_checkpoint", "checkpoint_problem", "rng_state", "set_rng_state", "CheckpointError",
           "OPTIMIZER_METADATA", "LATEST", "CRASH_ENV"]

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


LATEST = "latest"  # <output_dir>/latest: the name of the newest saved checkpoint
# Tests only: "<point>:<checkpoint name>" makes every rank exit (os._exit) at that point
# of saving that checkpoint: "before_manifest" (shards written) or "after_aside" (an
# existing checkpoint of the same name renamed aside, the new one not yet in place).
CRASH_ENV = "CHUNKFLOW_TEST_CRASH_SAVE"
_TMP, _OLD = ".tmp-", ".old-"


def _crash_point(point: str, name: str) -> None:
    if os.environ.get(CRASH_ENV) == f"{point}:{name}":
        logger.warning("%s=%s: exiting", CRASH_ENV, os.environ[CRASH_ENV])
        os._exit(86)


def _agree_nonce() -> str:
    """A random suffix, the same on every rank (rank 0's, broadcast). Drawn from the OS,
    not from torch: the saved random state must not be disturbed by saving."""
    value = torch.tensor([int.from_bytes(os.urandom(6), "little")], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        comm.broadcast(value, src=0)
    return f"{int(value[0]):012x}"


def _barrier() -> None:
    if dist.is_initialized():
        comm.barrier()


def _hash_shared(root: Path) -> Optional[dict[str, dict]]:
    """Every file under ``root`` hashed, the files dealt round-robin over the ranks
    (each hashes its share in threads); the full table on rank 0, None elsewhere."""
    rank, world = _world()
    names = list_files(root)  # the same list on every rank (largest first)
    mine = hash_files(root, names[rank::world])
    if world == 1:
        return mine
    parts = comm.gather_object(mine, dst=0)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else None


def _publish(tmp: Path, path: Path, nonce: str) -> None:
    """Rank 0: make ``tmp`` visible as ``path`` by one rename, then point ``latest`` at it."""
    old = None
    if path.exists():  # re-saving a name: the old one stays complete under another name
        old = path.with_name(f"{_OLD}{path.name}-{nonce}")
        os.rename(path, old)
        _crash_point("after_aside", path.name)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    write_text_atomic(path.parent / LATEST, path.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path,
    *,
    model: Any,
    optimizer: Optional[Any],
    trainer_state: dict,
    rank: int,
    extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically (see module doc). Collective: every rank
    calls it. ``extra(dir)``, if given, writes more files into the checkpoint before the
    manifest (every rank calls it). Returns ``path``."""
    path = Path(path)
    rng = rng_state()  # before anything below could draw
    nonce = _agree_nonce()
    tmp = path.with_name(f"{_TMP}{path.name}-{nonce}")
    if rank == 0:
        (tmp / "model").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    torch.save(rng, tmp / "rng" / f"rank{_world()[0]}.pt")
    sd: dict[str, Any] = {"model": _model_sd(model)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(sd, str(tmp / "model"))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
    if extra is not None:
        extra(tmp)
    _barrier()  # every file exists
    _crash_point("before_manifest", path.name)
    entries = _hash_shared(tmp)
    if rank == 0:
        write_manifest_entries(tmp, entries)
        _publish(tmp, path, nonce)
    _barrier()
    return path


def read_trainer_state(path: str | Path) -> dict:
    p = Path(path) / "trainer.json"
    if not p.is_file():
        raise FileNotFoundError(f"train.load={path}: no trainer.json (not a chunkflow checkpoint)")
    return json.loads(p.read_text())


def _saved_keys(model_dir: Path) -> set:
    return set(read_dcp_metadata(model_dir).state_dict_metadata)


def _restore_rng(path: Path) -> bool:
    rank, world = _world()
    f = path / "rng" / f"rank{rank}.pt"
    if not f.is_file():
        logger.warning("%s has no rng/rank%d.pt: random state continues from the run's seed", path, rank)
        return False
    state = torch.load(f, map_location="cpu", weights_only=True)
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


# --------------------------------------------------------------------------- checking
def checkpoint_problem(path: str | Path, *, full: bool = False, names: Optional[Iterable[str]] = None) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint ("incomplete (...)", "corrupt (...)"),
    or None. Sizes only, unless ``full`` (hash ``names``, default every file)."""
    path = Path(path)
    if not path.is_dir():
        return "missing (no such directory)"
    try:
        files = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    problem = check_sizes(path, files)
    if problem or not full:
        return problem
    return verify_files(path, files, sorted(files) if names is None else list(names))


def _refusal(path: Path, problem: str) -> CheckpointError:
    newest = latest_checkpoint(path.parent, exclude=path)
    where = f"the newest valid checkpoint is {newest}" if newest else f"no valid checkpoint under {path.parent}"
    return CheckpointError(f"checkpoint {path} is {problem}; {where}")


def verify_checkpoint(path: str | Path, *, collective: bool = True) -> None:
    """Hash every file of ``path`` against its manifest, or raise a ``CheckpointError``
    naming the file and the newest valid checkpoint. ``collective`` (with a process
    group): the ranks share the hashing, every rank must call, all raise alike."""
    path = Path(path)
    problem = checkpoint_problem(path)  # manifest present, sizes match: cheap, every rank
    if problem is None:
        rank, world = _world() if collective else (0, 1)
        names = sorted(read_manifest(path))[rank::world]
        problem = checkpoint_problem(path, full=True, names=names)
        if world > 1:
            problem = next((p for p in comm.all_gather_object(problem) if p), None)
    if problem:
        raise _refusal(path, problem)


def _check_safe(path: Path) -> None:
    """Read the DCP metadata through the allow-list and load every stored object with
    ``weights_only`` before megatron unpickles them (checkpoint_files.py)."""
    check_pickled_objects(path / "model", read_dcp_metadata(path / "model"))


def _check_keys(path: Path, requested: set, saved: set, base_only: bool) -> None:
    """Strict loading: the model's tensors (over all ranks) and the checkpoint's model
    tensors must be the same set; names the differences. Optimizer state and megatron's
    stored objects (``_extra_state``) are not model tensors."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        requested = set().union(*comm.all_gather_object(requested))
    saved_model = {k for k in saved if not k.startswith("optimizer.") and "/shard_" not in k}
    if base_only:
        saved_model = {k for k in saved_model if ".lora_" not in k}
    missing, unexpected = sorted(requested - saved_model), sorted(saved_model - requested)
    if not (missing or unexpected):
        return
    hint = ""
    if any(".lora_" in k for k in unexpected):
        hint = " (a checkpoint with LoRA adapters: set lora.enabled=true with its lora.rank/targets)"
    raise CheckpointError(
        f"checkpoint {path} does not match the model: "
        + (f"missing {len(missing)} tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; " if missing else "")
        + (f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:8])}"
           f"{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
        + hint + " (check model.* against the checkpoint's trainer.json config)")


def load_checkpoint(path: str | Path, *, model: Any, optimizer: Optional[Any]) -> dict:
    """Verify ``path`` (manifest hashes, safe metadata), then load model (and optimizer)
    state in place strictly and restore this rank's random state (see module doc);
    return the trainer state dict. Collective: every rank calls it."""
    path = Path(path)
    verify_checkpoint(path)
    _check_safe(path)
    state = read_trainer_state(path)
    sd: dict[str, Any] = {"model": _model_sd(model)}
    saved = _saved_keys(path / "model")
    adapters = [getattr(v, "key", k) for k, v in sd["model"].items() if ".lora_" in k]
    base_only = bool(adapters) and adapters[0] not in saved  # a base model for LoRA
    if base_only:
        sd["model"] = {k: v for k, v in sd["model"].items() if ".lora_" not in k}
        state = {**state, "model_only": True, "step": 0}
    _check_keys(path, _tensor_keys(sd["model"]), saved, base_only)
    if state.get("model_only"):  # written by import_hf: no optimizer state to restore
        optimizer = None
    if optimizer is not None:
        _init_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(sd, str(path / "model"))
    module = getattr(model, "module", model)
    result = module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not (base_only and ".lora_" in k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path}: state does not fit the model: missing {missing[:8]}, "
                              f"unexpected {result.unexpected_keys[:8]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if not state.get("model_only"):
        state = {**state, "rng_restored": _restore_rng(path)}
    return state


def _tensor_keys(model_sd: dict) -> set:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {getattr(v, "key", k) for k, v in model_sd.items() if not isinstance(v, ShardedObject)}


# --------------------------------------------------------------------------- which one
def _step_of(d: Path) -> Optional[int]:
    try:
        return int(read_trainer_state(d)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, including one renamed aside by a re-save
    that was killed before the new one took its name (``.old-<name>-<nonce>``)."""
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and (d.name.startswith("checkpoint") or d.name.startswith(_OLD))]


def latest_checkpoint(output_dir: str | Path, *, exclude: Optional[Path] = None) -> Optional[Path]:
    """The newest valid checkpoint under ``output_dir`` (``train.load: auto``), or None.

    Valid: a manifest whose files are all present with their sizes (no hashing; loading
    hashes). The one ``<output_dir>/latest`` names if valid, else the valid one with the
    highest step. Raises ``CheckpointError`` if checkpoints exist but none is valid,
    rather than let ``auto`` start afresh over them.
    """
    root = Path(output_dir)
    skip = exclude.resolve() if exclude else None
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name and named.resolve() != skip and checkpoint_problem(named) is None:
            return named
    best: Optional[tuple[int, bool, float, Path]] = None
    invalid = []
    for d in _candidates(root):
        if d.resolve() == skip:
            continue
        problem = checkpoint_problem(d)
        step = _step_of(d)
        if problem or step is None:
            invalid.append(f"{d.name} ({problem or 'no step in trainer.json'})")
            continue
        key = (step, not d.name.startswith(_OLD), d.stat().st_mtime, d)
        if best is None or key[:3] > best[:3]:
            best = key
    if best:
        return best[3]
    if invalid and exclude is None:
        raise CheckpointError(f"{root}: no valid checkpoint, only {'; '.join(sorted(invalid))}. Load one "
                              f"explicitly with train.load=<dir> once repaired (docs/checkpoints.md), or use "
                              f"another train.output_dir")
    return None


def prune_checkpoints(output_dir: str | Path, keep: int, *, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Rank 0, after a successful save: delete the oldest complete ``checkpoint_step*``
    beyond the newest ``keep`` (0 = keep all), never one in ``protect``; also remove
    leftovers of killed saves (``.tmp-*``, and ``.old-<name>-*`` once ``<name>`` is
    valid). Returns what was deleted."""
    root = Path(output_dir)
    kept = {Path(p).resolve() for p in protect}
    deleted = []
    for d in list(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.resolve() in kept:
            continue
        stale = d.name.startswith(_TMP) or (
            d.name.startswith(_OLD) and checkpoint_problem(root / d.name[len(_OLD):].rsplit("-", 1)[0]) is None)
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            deleted.append(d)
    if keep > 0:
        complete = [(s, d) for d in root.glob("checkpoint_step*")
                    if checkpoint_problem(d) is None and (s := _step_of(d)) is not None]
        complete.sort(key=lambda sd: sd[0])
        for _, d in complete[:-keep]:
            if d.resolve() not in kept:
                shutil.rmtree(d)
                deleted.append(d)
    return deleted
