"""Elapsed time, ETA and a one-line progress display on the logging rank.

On a terminal the line is redrawn in place every step (carriage return, no extra
package)::

    step    12/40 [######..............]  30%  elapsed 0:00:21  eta 0:00:49  tokens/s/gpu 812  loss 5.1022

Elsewhere (a SLURM log, a pipe) nothing is redrawn: the trainer's periodic log line
(every ``train.log_every`` steps) carries ``elapsed`` and ``eta`` instead.

The ETA assumes the remaining steps take as long on average as the ones this process
has run so far (a resumed run counts from its resume step, not from step 0)::

    eta = elapsed / (step - start_step) * (total_steps - step)
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

__all__ = ["Progress", "eta_seconds", "format_duration"]


def eta_seconds(elapsed_s: float, start_step: int, step: int, total_steps: int) -> Optional[float]:
    """Seconds left at ``step`` of ``total_steps`` after ``elapsed_s`` since ``start_step``;
    ``None`` before the first step of this process has finished."""
    done = step - start_step
    if done <= 0:
        return None
    return elapsed_s / done * max(total_steps - step, 0)


def format_duration(seconds: Optional[float]) -> str:
    """``3725.2`` -> ``"1:02:05"``; ``None`` -> ``"?"``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Times a run from its construction; draws the in-place line when ``tty``."""

    def __init__(self, total_steps: int, start_step: int, *, tty: bool = False, stream: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.perf_counter, width: int = 20):
        self.total_steps, self.start_step = total_steps, start_step
        self.tty, self.stream, self.clock, self.width = tty, stream, clock, width
        self.t0 = clock()
        self._shown = False

    def times(self, step: int) -> tuple[float, Optional[float]]:
        """(elapsed seconds, ETA seconds or None) after ``step`` has finished."""
        elapsed = self.clock() - self.t0
        return elapsed, eta_seconds(elapsed, self.start_step, step, self.total_steps)

    def summary(self, step: int) -> str:
        """``"elapsed 0:00:21  eta 0:00:49"`` for the periodic log line."""
        elapsed, eta = self.times(step)
        return f"elapsed {format_duration(elapsed)}  eta {format_duration(eta)}"

    def show(self, record: dict) -> None:
        """Redraw the in-place line (terminal only)."""
        if not self.tty:
            return
        step, total = record["step"], self.total_steps
        filled = int(self.width * min(step / total, 1.0)) if total else self.width
        line = (f"step {step:>5}/{total} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * step / max(total, 1):3.0f}%  {self.summary(step)}  "
                f"tokens/s/gpu {record.get('tokens_per_s_per_gpu', 0):.0f}  loss {record.get('loss', float('nan')):.4f}")
        self.stream.write("\r" + line + "\033[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the in-place line before a regular log line is printed."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
