"""Graceful pre-emption: a signal asks for a checkpoint at the next step boundary.

Clusters warn before they take a job's nodes: SLURM sends ``SIGUSR1`` (``--signal``) or
``SIGTERM`` some time ahead, and a user presses Ctrl-C (``SIGINT``). The trainer
installs :class:`PreemptionGuard` for the signals in ``train.preempt_signals``:

* the first signal only sets a flag; the step in progress finishes;
* before each optimizer step every rank learns whether *any* rank was signalled (the
  trainer's one MAX all-reduce of per-step flags, ``Trainer._step_flags``), so all ranks
  finish the same step, save one checkpoint together and exit 0 with a message;
* a second signal of the same process ends it at once (exit code 128 + signal number),
  for the operator who really means it.

Which process receives the signal matters under ``torchrun``: torchrun forwards SIGTERM
and SIGINT to its workers, but SIGUSR1 would end torchrun itself. Send SIGUSR1 to the
worker processes (``scripts/slurm/finetune.sbatch`` does), or use SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional, Sequence
__all__ = ["PreemptionGuard"]


class PreemptionGuard:
    """Turns the first of ``signals`` into a flag; the second ends the process."""

    def __init__(self, signals: Sequence[str], *, log: Any = print):
        self.requested: Optional[str] = None
        self.log = log
        self._previous: dict[int, Any] = {}
        for name in signals:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"train.preempt_signals: unknown signal {name!r}")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write(f"second signal ({name}) after {self.requested}: exiting now, without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = name
        sys.stderr.write(f"{name} received: saving a checkpoint at the end of this step, then exiting "
                         f"(send it again to exit at once)\n")
        sys.stderr.flush()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
