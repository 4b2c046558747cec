"""How a failed run reaches the user: one line, printed once, and an exit code.

    try:
        ...
    except BaseException as exc:
        return report_failure(exc, rank=rank)   # prints one line (once per job), returns the code

=========================================  ====  ==========================================
what failed                                code  the line
=========================================  ====  ==========================================
:class:`~chunkflow.config.errors.UserError`  2   ``error: <culprit>: <what differs>; <fix>``
(config, data, tokenizer, HF dir, checkpoint,
layout)
:class:`~chunkflow.train.trainer.NonFiniteError` 1 ``stopped: step N: ...``
a peer stopped answering or died (gloo/NCCL   1   ``rank R: lost contact with the other ranks
timeout, connection closed)                       ...``
anything else (a bug)                         1   ``internal error on rank R: Type: message``
                                                  after the traceback
=========================================  ====  ==========================================

*Once per job*: before process groups exist every rank sees the same input, so only
rank 0 prints. Afterwards the first rank to fail claims the report with one ``add`` on
the job's rendezvous store (short timeout); the others stay silent, and a rank that cannot
reach the store (its host died) prints anyway. See docs/errors.md.

:func:`load_checkpoint_checked` is the trainer's checkpoint load: it checks the directory
against the run's config first (existence, ``trainer.json``, model shape, optimizer
layout) and turns what megatron and torch raise while reading (``Global shape
mismatch``, a truncated shard's ``EOFError``) into a :class:`CheckpointError` naming the
path.
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from chunkflow.config.errors import USER_ERROR_EXIT, UserError
from chunkflow.train.checkpoint_files import CheckpointError  # the one checkpoint error type

__all__ = ["CheckpointError", "PeerFailure", "describe_failure", "report_failure", "is_peer_failure",
           "launcher_rank",
           "check_checkpoint", "load_checkpoint_checked", "USER_ERROR_EXIT"]

# Architecture fields a checkpoint's weights must agree on (trainer.json's config.model).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "qkv_bias", "tie_embeddings")
_PEER_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                 "socket closed", "peer", "nccl communicator was aborted")




class PeerFailure(RuntimeError):
    """Another rank stopped answering (a collective or p2p wait hit parallel.timeout_s)."""


def describe_failure(exc: BaseException, rank: int = 0) -> tuple[str, int]:
    """The line to print and the exit code for ``exc`` (see the module doc's table)."""
    if isinstance(exc, UserError):
        return f"error: {_one_line(exc)}", USER_ERROR_EXIT
    if type(exc).__name__ == "NonFiniteError":  # train.trainer's; named to stay import-free
        return f"stopped: {_one_line(exc)}", 1
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, PeerFailure) or is_peer_failure(exc):
        first = _one_line(exc)[:300]
        return (f"rank {rank}: lost contact with the other ranks (a rank died, hung or was stopped; "
                f"waited up to parallel.timeout_s): {first}"), 1
    return f"internal error on rank {rank}: {type(exc).__name__}: {_one_line(exc)[:500]}", 1


def report_failure(exc: BaseException, *, rank: int, groups_exist: bool, file: Any = None) -> int:
    """Print ``exc``'s line once per job (see module doc) and return its exit code. A bug
    (internal error) also gets its traceback, on the rank that prints."""
    line, code = describe_failure(exc, rank)
    file = file or sys.stderr
    if _claim_report(rank, groups_exist):
        if line.startswith("internal error"):
            traceback.print_exception(exc, file=file)
        print(line, file=file, flush=True)
    return code


def launcher_rank() -> int:
    """This process's rank as the launcher set it; 0 when unset or not a valid rank (a
    broken environment is reported by every process: none can tell it is rank 0)."""
    import os

    raw = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    if raw.strip().isdigit() and world.strip().isdigit() and int(raw) < int(world):
        return int(raw)
    return 0


_reports = 0  # failures reported by this process (one per job, but tests run several)


def _claim_report(rank: int, groups_exist: bool) -> bool:
    global _reports
    _reports += 1
    if not groups_exist:
        return rank == 0  # every rank saw the same input and the same error
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        if not dist.is_initialized():
            return rank == 0
        store = _get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        return int(store.add(f"chunkflow/failure_reported/{_reports}", 1)) == 1
    except Exception:  # the store's host is gone: better twice than never
        return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def is_peer_failure(exc: BaseException) -> bool:
    """Did ``exc`` come from waiting for a rank that died, hung or was stopped?"""
    if isinstance(exc, PeerFailure):
        return True
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = " ".join(str(e).lower() for e in _chain(exc) if isinstance(e, RuntimeError))
    return ("gloo" in text or "nccl" in text or "store" in text) and any(m in text for m in _PEER_MARKERS)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


# ---------------------------------------------------------------------------- checkpoints
def check_checkpoint(path: str | Path, cfg: Any) -> dict:
    """Check ``path`` against the run's config before any shard is read; return its
    trainer state. Raises :class:`CheckpointError` naming the path and what differs."""
    p = Path(path)
    where = f"train.load={path}"
    if not p.exists():
        raise CheckpointError(f"{where}: no such directory")
    if not p.is_dir():
        raise CheckpointError(f"{where}: is a file; give a checkpoint directory (it holds trainer.json and model/)")
    tj = p / "trainer.json"
    if not tj.is_file():
        raise CheckpointError(f"{where}: no trainer.json, not a chunkflow checkpoint (a run writes "
                              f"<output_dir>/checkpoint or checkpoint_step<N>; an HF directory goes in model.hf_dir)")
    try:
        state = json.loads(tj.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: {tj} is unreadable or has no step ({e}); the save did not finish") from None
    if not (p / "model" / "metadata.json").is_file():
        raise CheckpointError(f"{where}: no model/metadata.json; the save did not finish or the directory is damaged")
    saved = (state.get("config") or {}).get("model") or {}
    diffs = [f"{k} {saved[k]}" + f" (config has {getattr(cfg.model, k)})"
             for k in SHAPE_FIELDS if k in saved and saved[k] != getattr(cfg.model, k)]
    if diffs:
        raise CheckpointError(f"{where}: checkpoint has {', '.join(diffs)}; load it with the same model "
                              "settings (or model.hf_dir of the same model)")
    _check_optimizer_layout(state, cfg, where)
    return state


def _check_optimizer_layout(state: dict, cfg: Any, where: str) -> None:
    """The plain optimizer's state is saved per (TP, PP) shard and loads only into the same
    split; the distributed optimizer's reshards (train/checkpoint.py)."""
    if state.get("model_only") or cfg.train.distributed_optimizer or cfg.lora.enabled:
        return
    saved = state.get("config") or {}
    sp, st = saved.get("parallel") or {}, saved.get("train") or {}
    if not sp or st.get("distributed_optimizer"):
        if st.get("distributed_optimizer"):
            raise CheckpointError(f"{where}: saved with train.distributed_optimizer=true, this run has false; "
                                  "resume with the same setting")
        return
    was = (sp.get("tensor", 1), sp.get("pipeline", 1))
    now = (cfg.parallel.tensor, cfg.parallel.pipeline)
    if was != now:
        raise CheckpointError(
            f"{where}: optimizer state saved with parallel.tensor={was[0]} pipeline={was[1]}, this run has "
            f"tensor={now[0]} pipeline={now[1]}; the plain optimizer resumes only in its own layout: use the "
            "saved layout, or train.distributed_optimizer=true for both runs")


def load_checkpoint_checked(path: str | Path, cfg: Any, *, model: Any, optimizer: Optional[Any]) -> dict:
    """:func:`check_checkpoint`, then ``train.checkpoint.load_checkpoint`` with its
    failures while reading translated into :class:`CheckpointError`."""
    from chunkflow.train.checkpoint import load_checkpoint

    check_checkpoint(path, cfg)
    try:
        return load_checkpoint(path, model=model, optimizer=optimizer)
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch DCP's CheckpointException is a BaseException
        cause = _unwrap(e)
        if is_peer_failure(cause):
            raise
        raise CheckpointError(f"train.load={path}: cannot read it into this model: {_read_error(cause)}") from e


def _unwrap(e: BaseException) -> BaseException:
    """torch.distributed.checkpoint wraps each rank's exception (with its traceback text)
    in a ``CheckpointException``; the first rank's own exception says what went wrong."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return inner
    return e


def _read_error(e: BaseException) -> str:
    text = _one_line(e)
    if "Global shape mismatch" in text or "shape mismatch" in text.lower():
        return f"a tensor's shape differs from this model's ({text[:300]})"
    if isinstance(e, (EOFError,)) or "EOF" in text or "unpickl" in text.lower() or "truncat" in text.lower():
        return f"a shard is truncated or corrupt ({type(e).__name__}: {text[:200]}); the save did not finish"
    return f"{type(e).__name__}: {text[:300]}"
