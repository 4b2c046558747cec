"""Run a function on N local processes with a gloo process group, for tests and tools.

    results = run_distributed(fn, world_size=2, args=(cfg_overrides,), timeout_s=300)

Each rank runs ``fn(rank, world_size, *args)`` in a fresh spawned interpreter with
torchrun-style environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free loopback port) and one intra-op thread. The return values
come back in rank order. If any rank raises, the others are terminated and a
:class:`DistributedFailure` carrying that rank's traceback is raised; if the group does
not finish within ``timeout_s``, every rank is killed and the error says which ranks
were still running (so a hang fails the test instead of blocking CI).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = ["run_distributed", "free_port", "DistributedFailure"]


class DistributedFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent: int) -> None:
    """Linux: this rank is killed when the process that started it dies (an interrupted
    test run must not leave ranks waiting on a peer forever). Elsewhere a no-op."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _entry(fn: Callable, rank: int, world: int, port: int, args: Sequence[Any], queue: Any, env: dict,
           parent: int = 0) -> None:
    if parent:
        _die_with_parent(parent)
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        from chunkflow.parallel.comm import install_strict_checks, strict_requested

        if strict_requested():  # CHUNKFLOW_STRICT_DEVICES, inherited from the parent
            install_strict_checks()
        result = fn(rank, world, *args)
        # Serialise with torch.save: tensors sent through a Queue as-is travel as
        # shared-memory handles that die with this process.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(
    fn: Callable, world_size: int, args: Sequence[Any] = (), *, timeout_s: float = 300,
    env: dict | None = None, attempts: int = 3,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; see module doc.

    A free port can be taken by another process between choosing and binding it; a
    group that fails with EADDRINUSE is retried on a new port (``attempts`` in all).
    """
    for attempt in range(attempts):
        try:
            return _run_once(fn, world_size, args, timeout_s, env)
        except DistributedFailure as e:
            if "EADDRINUSE" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable, world_size: int, args: Sequence[Any], timeout_s: float,
              env: dict | None) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        # Not daemonic: megatron's checkpoint saving starts helper processes, which a
        # daemonic process may not. The finally-block below reaps every rank.
        ctx.Process(target=_entry, args=(fn, r, world_size, port, tuple(args), queue, dict(env or {}), os.getpid()), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistributedFailure(f"timed out after {timeout_s:.0f}s; ranks {missing} still running")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and p.exitcode not in (0, None)]
                if dead:
                    raise DistributedFailure(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise DistributedFailure(f"rank {rank} failed:\n{payload}")
            import torch

            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
