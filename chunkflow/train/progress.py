"""Elapsed time, ETA and a one-line progress display: training steps, and any loop over
N of M items (tensors converted, samples tokenized, benchmark runs).

On a terminal the line is redrawn in place every step (carriage return, no extra
package)::

    step    12/40 [######..............]  30%  elapsed 0:00:21  eta 0:00:49  tokens/s/gpu 812  loss 5.1022

Elsewhere (a SLURM log, a pipe) nothing is redrawn: the trainer's periodic log line
(every ``train.log_every`` steps) carries ``elapsed`` and ``eta`` instead.

The ETA assumes the remaining steps take as long on average as the ones this process
has run so far (a resumed run counts from its resume step, not from step 0)::

    eta = elapsed / (step - start_step) * (total_steps - step)

Long work outside the training loop uses :class:`ItemProgress`, the same two modes::

    progress = ItemProgress(len(names), "tensors", label="import", total_bytes=total)
    for name in names:
        ...                                   # convert one tensor
        progress.advance(nbytes=t.nbytes)     # one item done (and its bytes)
    progress.finish()                         # the closing line, on a terminal or not

On a terminal the line is redrawn in place (at most ``redraw_s`` apart); elsewhere (a
SLURM log, a pipe, a test) a plain line is printed every ``every_s`` seconds, so a log
gets a few lines, not one per item::

    import: 120/339 tensors [#######.............]  35%  1.20/3.40 GiB  elapsed 0:00:12  eta 0:00:22
    import: 339 tensors, 3.40 GiB in 0:00:34

The ETA is proportional to the bytes done when ``total_bytes`` is given (items differ in
size: an embedding is not a layer norm), otherwise to the items done. Pass
``stream=None`` to silence it (e.g. on every rank but one); ``tty`` defaults to
``stream.isatty()``.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

__all__ = ["Progress", "ItemProgress", "eta_seconds", "format_duration", "format_bytes"]


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


def format_bytes(n: float) -> str:
    """``3.4 * 2**30`` -> ``"3.40 GiB"`` (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


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


class ItemProgress:
    """Progress of a loop over ``total`` items; see the module docstring."""

    def __init__(self, total: int, what: str = "items", *, label: str = "", total_bytes: Optional[int] = None,
                 stream: Optional[TextIO] = sys.stdout, tty: Optional[bool] = None, every_s: float = 10.0,
                 redraw_s: float = 0.2, clock: Callable[[], float] = time.perf_counter, width: int = 20):
        self.total, self.what, self.total_bytes = total, what, total_bytes
        self.prefix = f"{label}: " if label else ""
        self.stream, self.clock, self.width = stream, clock, width
        self.tty = bool(stream is not None and (stream.isatty() if tty is None else tty))
        self.every_s = redraw_s if self.tty else every_s
        self.done, self.bytes_done = 0, 0
        self.t0 = clock()
        self._last = self.t0
        self._shown = False

    def times(self) -> tuple[float, Optional[float]]:
        """(elapsed seconds, ETA seconds or None before the first item)."""
        elapsed = self.clock() - self.t0
        if self.total_bytes:
            if self.bytes_done <= 0:
                return elapsed, None
            return elapsed, elapsed / self.bytes_done * max(self.total_bytes - self.bytes_done, 0)
        return elapsed, eta_seconds(elapsed, 0, self.done, self.total)

    def line(self) -> str:
        """``"import: 120/339 tensors [###...]  35%  1.20/3.40 GiB  elapsed 0:00:12  eta 0:00:22"``."""
        frac = self.done / self.total if self.total else 1.0
        if self.total_bytes:
            frac = self.bytes_done / self.total_bytes
        filled = int(self.width * min(frac, 1.0))
        size = (f"  {format_bytes(self.bytes_done)}/{format_bytes(self.total_bytes)}" if self.total_bytes
                else f"  {format_bytes(self.bytes_done)}" if self.bytes_done else "")
        elapsed, eta = self.times()
        return (f"{self.prefix}{self.done}/{self.total} {self.what} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * frac:3.0f}%{size}  elapsed {format_duration(elapsed)}  eta {format_duration(eta)}")

    def advance(self, n: int = 1, *, nbytes: int = 0) -> None:
        """``n`` more items (of ``nbytes`` together) are done; redraw or print if due."""
        self.done += n
        self.bytes_done += nbytes
        now = self.clock()
        if self.stream is None or now - self._last < self.every_s or self.done >= self.total:
            return  # the last item: finish() says it
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
            self._shown = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self, note: str = "") -> None:
        """The closing line (replacing the in-place one): items, bytes, total time."""
        if self.stream is None:
            return
        size = f", {format_bytes(self.bytes_done)}" if self.bytes_done else ""
        text = (f"{self.prefix}{self.done} {self.what}{size} in {format_duration(self.clock() - self.t0)}"
                + (f"; {note}" if note else ""))
        self.stream.write(("\r" if self._shown else "") + text + ("\033[K" if self._shown else "") + "\n")
        self.stream.flush()
        self._shown = False
