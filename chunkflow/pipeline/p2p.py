"""Point-to-point transfers of one pipeline stage, posted early and waited for late.

    posted = post(comm, outbox, inbox, group=g, device=d, dtype=dt, shape=shape_of_mb)
    x = received(inbox, device, ("activation", mb))   # waits for that receive only

A ``Comm`` step's sends and receives go out together (``batch_isend_irecv``) and nothing
is waited for when they are posted. Send buffers come from ``outbox`` and are placed on
the device the group's backend takes (``chunkflow.parallel.comm``); a received tensor
lands in ``inbox`` with its request and is waited for by :func:`received`, right before
the compute that reads it. The caller waits for the sends (``Posted.wait_all``) at a
later ``Comm``; until then it keeps the ``Posted``, which keeps the send buffers alive.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from chunkflow.parallel import comm as comm_mod
from chunkflow.pipeline.plan import Comm

__all__ = ["Posted", "post", "received"]


class Posted:
    """The requests of one posted ``Comm``. gloo (no coalescing) returns one request per op,
    so a receive waits for itself alone; NCCL returns the batch's coalesced request(s), and
    waiting for them (a stream dependency, not a host wait) covers every op of the batch."""

    def __init__(self, ops: list, works: list):
        self.ops, self.works = ops, list(works)
        self.per_op = len(self.works) == len(ops)
        self.done: set[int] = set()

    def wait_op(self, i: int) -> None:
        for j in ([i] if self.per_op else range(len(self.works))):
            if j not in self.done:
                self.works[j].wait()
                self.done.add(j)

    def wait_all(self) -> None:
        for j in range(len(self.works)):
            if j not in self.done:
                self.works[j].wait()
                self.done.add(j)
        self.ops = []  # the send buffers may go


def post(comm: Comm, outbox: dict, inbox: dict, *, group: Any, device: torch.device, dtype: torch.dtype,
         shape: Callable[[int], tuple[int, ...]]) -> Posted:
    """Post one ``Comm``'s sends (tensors popped from ``outbox`` by ``(payload, mb)``) and
    receives (buffers of ``shape(mb)``, put in ``inbox`` under ``(payload, mb)``); wait
    for none of them."""
    ops, kinds = [], []
    for op in comm.ops:
        peer = dist.get_global_rank(group, op.peer)
        if op.op == "send":
            t = comm_mod.p2p_placed(outbox.pop((op.payload, op.mb)), group)
            ops.append(dist.P2POp(dist.isend, t, peer, group=group))
            kinds.append(None)
        else:
            t = torch.empty(shape(op.mb), dtype=dtype, device=comm_mod.comm_device(group, prefer=device))
            ops.append(dist.P2POp(dist.irecv, t, peer, group=group))
            kinds.append((op.payload, op.mb))
    posted = Posted(ops, dist.batch_isend_irecv(ops) if ops else [])
    for i, key in enumerate(kinds):
        if key is not None:
            inbox[key] = (ops[i].tensor, posted, i)
    return posted


def received(inbox: dict, device: torch.device, key: tuple) -> torch.Tensor:
    """The tensor received under ``key``, waiting for its receive only now, on ``device``."""
    t, posted, i = inbox.pop(key)
    posted.wait_op(i)
    return t if t.device == device else t.to(device)
