"""torchrun with the worker's exit code and without torchrun's failure report.

    python -m chunkflow.parallel.launch --nproc-per-node 2 scripts/finetune.py --config c.yaml

takes exactly torchrun's arguments. Plain ``torchrun`` turns any failed worker into exit
code 1, a Python traceback of its own and a ``ChildFailedError`` banner (measured with
torch 2.13), so a user error's one line (exit code 2) drowns. This launcher runs the
same agent in-process, keeps its logs at CRITICAL, and exits with the exit code of the
first worker that failed (the root cause; a worker killed by a signal counts as 1), so
``error: <culprit>`` printed by the worker is the only thing the user sees. See
docs/errors.md.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's banner otherwise; set it to tune
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    _shorten_teardown(int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")))
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _shorten_teardown(grace_s: int) -> None:
    """After a worker fails, torchrun sends the others SIGTERM and waits 30 s before
    SIGKILL (its ``_stop_workers`` ignores ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``). A stopped
    or hung worker cannot act on SIGTERM, so that wait is pure delay: use ``grace_s``."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if hasattr(LocalElasticAgent, "_stop_workers") and hasattr(LocalElasticAgent, "_shutdown"):
        LocalElasticAgent._stop_workers = lambda self, worker_group: self._shutdown(timeout=grace_s)


if __name__ == "__main__":
    sys.exit(main())
