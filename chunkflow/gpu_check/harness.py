"""Isolated checks, their results, the PASS/FAIL/SKIP table and the JSON report.

A check is a function returning a :class:`Result` (or raising :class:`Skip`). The
runner gives each one its own ``try``: an exception becomes a FAIL of that check whose
reason is the exception's last line (out-of-memory is named as such), and the next
check still runs. Between checks the device's cache is emptied and its peak-memory
counter reset, so an OOM in one check does not starve the next::

    STATUS  CHECK                         SECONDS  VALUE / REASON
    PASS    attention[flash-attn,bf16]        1.2  worst rel 4.1e-03 (packed dq), tol 2.0e-02
    FAIL    train[chunkflow]                 41.0  out of memory: CUDA out of memory. Tried ...
    SKIP    multi_gpu[verify,tp2]             0.0  needs 2 CUDA devices, found 1
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["PASS", "FAIL", "SKIP", "Result", "Skip", "Check", "run_checks", "format_table",
           "write_json", "exception_reason", "is_out_of_memory"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason shown."""


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    value: str = ""  # the key number(s), one line
    reason: str = ""  # why FAIL or SKIP
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # every number, for the JSON


@dataclass
class Check:
    """``fn()`` returns a Result (its name and seconds are filled in by the runner).

    ``needs``: names of earlier checks that must have passed; otherwise this one is a
    SKIP naming them (e.g. resuming needs the run that wrote the checkpoint).
    """

    name: str
    fn: Callable[[], Result]
    needs: tuple[str, ...] = ()


def is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in str(exc).lower() or isinstance(exc, MemoryError))


def exception_reason(exc: BaseException) -> str:
    """The exception's last line (type: message), prefixed when it is out of memory."""
    text = "".join(traceback.format_exception_only(type(exc), exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    name = type(exc).__name__
    if name not in last.split(":")[0]:  # a multi-line message: keep its type in front
        last = f"{name}: {last}"
    if is_out_of_memory(exc):
        return f"out of memory: {last}"
    return last


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_checks(checks: Iterable[Check], *, on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Run every check in order, each isolated; see module docstring."""
    results: list[Result] = []
    status: dict[str, str] = {}
    for check in checks:
        t0 = time.perf_counter()
        missing = [n for n in check.needs if status.get(n) != PASS]
        if missing:
            res = Result(check.name, SKIP, reason=f"needs {', '.join(missing)} to pass first")
        else:
            try:
                res = check.fn()
            except Skip as e:
                res = Result(check.name, SKIP, reason=str(e))
            except Exception as e:  # noqa: BLE001 - one failing check must not stop the rest
                res = Result(check.name, FAIL, reason=exception_reason(e),
                             details={"traceback": traceback.format_exc()[-4000:]})
            if res.status != SKIP:
                try:
                    _free_device_memory()
                except Exception:  # noqa: BLE001 - a broken device is reported by the next check
                    pass
        res.name = check.name
        res.seconds = time.perf_counter() - t0
        status[check.name] = res.status
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


def format_line(r: Result, width: int = 34) -> str:
    text = r.value if r.status == PASS else (f"{r.reason}  [{r.value}]" if r.value else r.reason)
    return f"{r.status:<6}  {r.name:<{width}}  {r.seconds:7.1f}  {text}"


def format_header(width: int = 34) -> str:
    return f"{'STATUS':<6}  {'CHECK':<{width}}  {'SECONDS':>7}  VALUE / REASON"


def format_table(results: list[Result], width: int = 34) -> str:
    lines = [format_header(width)] + [format_line(r, width) for r in results]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def write_json(path: str | Path, results: list[Result], meta: dict[str, Any]) -> None:
    report = {
        **meta,
        "ok": not any(r.status == FAIL for r in results),
        "counts": {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)},
        "checks": [asdict(r) for r in results],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
