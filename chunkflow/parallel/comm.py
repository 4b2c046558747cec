"""The collectives chunkflow issues itself, each placing its tensor on the group's device.

The device rule: a tensor handed to a collective must be on a device the group's backend
takes. An NCCL group takes CUDA tensors only ("No backend type associated with device
type cpu" otherwise); a gloo group, as chunkflow uses it, takes CPU tensors. Scalars that
the trainer reduces (loss sums, busy times) are born on the host, model tensors (LoRA
shards, vocab-parallel logits) on the run's device; which one a group needs depends on
the group, not on the caller. So every collective chunkflow issues goes through this
module, which asks the group:

    comm_device(group, prefer=t.device)
        backend "gloo" / "mpi"          -> cpu
        backend "nccl"                  -> cuda (the current device)
        backend "cpu:gloo,cuda:nccl"    -> prefer's type if the group takes it, else cuda
                                           (host scalars stay on the host, GPU tensors
                                           stay on the GPU: no copy either way)

and moves the tensor there (and the result back), so a caller never picks a device.
On CUDA machines :func:`chunkflow.parallel.distributed.init_distributed` also creates
the world with ``backend="cpu:gloo,cuda:nccl"``: megatron's sub-groups are made by
``torch.distributed.new_group(backend=None)``, which inherits the default group's
backend string, so a stray CPU tensor in a collective of theirs or ours goes through
gloo by design instead of raising. The pipeline executor posts its p2p itself
(``chunkflow/pipeline/executor.py``, asynchronously, to overlap it with compute), with
buffers placed by this module: sends through :func:`p2p_placed`, receive buffers
allocated on :func:`comm_device`.

The guard, and what it proves on a machine without a GPU
---------------------------------------------------------
:func:`install_strict_checks` wraps ``torch.distributed``'s collectives and p2p calls
(``CHUNKFLOW_STRICT_DEVICES=1`` turns it on in :func:`init_distributed` and in every
rank started by ``run_distributed``; ``tests/conftest.py`` sets it for the whole suite)
and raises :class:`DeviceRuleError` when a tensor's device is not one the group's
backend takes, in chunkflow's and in megatron's calls alike. On a CPU-only machine every
group is gloo and every tensor is on the CPU, so in the suite's own runs this check
cannot fire; what it does prove here is limited to:

* ``tests/test_device_rule.py`` scans ``chunkflow/`` (AST) and fails, listing file and
  line, on any direct ``torch.distributed`` collective outside this module and the
  executor's p2p. A collective added next month either goes through here or fails CI.
* unit tests with a faked backend name (``nccl``, mixed) show this module sends a CPU
  tensor to ``cuda`` for an NCCL group and keeps it on the host for a mixed one, and
  that the strict check rejects a CPU tensor in an "NCCL" collective.

What only a GPU run proves: that megatron's own collectives obey the rule with our
configuration, that NCCL accepts what we hand it, and that the mixed backend string
routes as described. Run the suite on a GPU box with ``CHUNKFLOW_STRICT_DEVICES=1``
(conftest sets it) and the strict wrappers then check every real NCCL call.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DeviceRuleError", "STRICT_ENV", "all_gather", "all_gather_into", "all_gather_object", "all_reduce",
    "p2p_placed",
    "backend_devices", "barrier", "broadcast", "comm_device", "gather_object",
    "install_strict_checks", "reduce_scalars", "strict_requested",
]

STRICT_ENV = "CHUNKFLOW_STRICT_DEVICES"

# Device type each single backend takes (as chunkflow uses it).
_SINGLE = {"gloo": "cpu", "mpi": "cpu", "nccl": "cuda", "xccl": "xpu"}
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DeviceRuleError(RuntimeError):
    """A tensor given to a collective is on a device its group's backend does not take."""


def backend_devices(backend: str) -> tuple[str, ...]:
    """Device types a backend string takes: ``"gloo"`` -> ``("cpu",)``,
    ``"cpu:gloo,cuda:nccl"`` -> ``("cpu", "cuda")``."""
    backend = str(backend).lower()
    if ":" in backend:
        return tuple(part.split(":", 1)[0].strip() for part in backend.split(",") if part.strip())
    if backend not in _SINGLE:
        raise ValueError(f"unknown process-group backend {backend!r}; known: {sorted(_SINGLE)} "
                         "or a per-device string such as 'cpu:gloo,cuda:nccl'")
    return (_SINGLE[backend],)


def comm_device(group: Any = None, prefer: Optional[torch.device] = None) -> torch.device:
    """The device a tensor for a collective on ``group`` must be on (see module doc)."""
    types = backend_devices(dist.get_backend(group))
    if prefer is not None and prefer.type in types:
        return prefer
    if "cuda" in types:
        return torch.device("cuda")  # the current device: set once per rank at startup
    return torch.device(types[0])


def _placed(t: torch.Tensor, group: Any) -> torch.Tensor:
    device = comm_device(group, prefer=t.device)
    return t if t.device.type == device.type else t.to(device)


def p2p_placed(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``t`` on the device ``group``'s backend takes, for a point-to-point send (no copy
    when it already is); the executor allocates its receive buffers on
    ``comm_device(group, prefer=stage device)`` likewise."""
    return _placed(t, group)


def all_reduce(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` (``op`` = sum | max | min); returns ``t``."""
    work = _placed(t, group)
    dist.all_reduce(work, op=_OPS[op], group=group)
    if work is not t:
        t.copy_(work)
    return t


def reduce_scalars(values: Sequence[float], *, op: str = "sum", group: Any = None) -> list[float]:
    """All-reduce a few host numbers (fp64); one collective, one device-to-host copy."""
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(group, prefer=torch.device("cpu")))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.cpu().tolist()


def all_gather(t: torch.Tensor, *, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape), on ``t``'s device, in group-rank order."""
    work = _placed(t.contiguous(), group)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [p.to(t.device) for p in parts]


def all_gather_into(out: torch.Tensor, t: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """``out`` (world x ``t``'s size, flat) filled with every rank's ``t``; returns ``out``."""
    work_out, work_in = _placed(out, group), _placed(t.contiguous(), group)
    dist.all_gather_into_tensor(work_out, work_in, group=group)
    if work_out is not out:
        out.copy_(work_out)
    return out


def broadcast(t: torch.Tensor, *, src: int, group: Any = None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``t``."""
    work = _placed(t, group)
    dist.broadcast(work, src=src, group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_gather_object(obj: Any, *, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj`` (torch stages the bytes on the group's device)."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, *, dst: int = 0, group: Any = None) -> Optional[list[Any]]:
    """Every rank's ``obj`` on global rank ``dst`` (None elsewhere)."""
    out: Optional[list] = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def barrier(group: Any = None) -> None:
    dist.barrier(group=group)


# ---------------------------------------------------------------------- strict mode
_CHECKED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
    "send", "recv", "isend", "irecv",
)
_installed = False


def strict_requested() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def check_devices(name: str, tensors: Sequence[torch.Tensor], group: Any) -> None:
    """Raise :class:`DeviceRuleError` if a tensor is on a device ``group`` does not take."""
    try:
        backend = dist.get_backend(group)
    except (ValueError, RuntimeError):
        return  # not a member of ``group`` (torch returns early) or no group yet: torch reports it
    takes = backend_devices(backend)
    for t in tensors:
        if t.device.type not in takes:
            raise DeviceRuleError(
                f"torch.distributed.{name}: a {t.device.type} tensor {tuple(t.shape)} on a group whose "
                f"backend {backend!r} takes {list(takes)}; issue it through "
                "chunkflow.parallel.comm, which places tensors on the group's device")


def _strict(name: str, fn: Any) -> Any:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        tensors = [t for k, v in bound.arguments.items() if k != "group" for t in _tensors(v)]
        check_devices(name, tensors, group)
        return fn(*args, **kwargs)

    wrapped._chunkflow_strict = True  # type: ignore[attr-defined]
    return wrapped


def _strict_batch(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapped(p2p_op_list: list, *args: Any, **kwargs: Any) -> Any:
        for op in p2p_op_list:
            check_devices("batch_isend_irecv", [op.tensor], op.group)
        return fn(p2p_op_list, *args, **kwargs)

    wrapped._chunkflow_strict = True  # type: ignore[attr-defined]
    return wrapped


def install_strict_checks() -> bool:
    """Wrap ``torch.distributed``'s collectives with :func:`check_devices`. Idempotent.

    Both ``torch.distributed.X`` and ``torch.distributed.distributed_c10d.X`` are
    replaced by the same wrapper: ``P2POp`` validates its op against the latter, and
    code that imported ``torch.distributed`` looks up the former at call time.
    """
    global _installed
    if _installed:
        return False
    c10d = dist.distributed_c10d
    for name in _CHECKED:
        original = getattr(c10d, name)
        if getattr(original, "_chunkflow_strict", False):
            continue
        wrapped = _strict(name, original)
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    wrapped_batch = _strict_batch(c10d.batch_isend_irecv)
    c10d.batch_isend_irecv = wrapped_batch
    dist.batch_isend_irecv = wrapped_batch
    _installed = True
    return True
