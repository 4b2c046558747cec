"""The multi-GPU part: the project's own entry points under torchrun, over NCCL.

The driver stays one process; each check runs ::

    python -m torch.distributed.run --nproc-per-node 2 --master-port <free> \
        scripts/<entry>.py --config <workdir>/<run>.yaml parallel.tensor=2 ...

and reads its exit code, its last ``max_rel_grad_diff=`` line (verify_equivalence.py)
or its metrics.jsonl (finetune.py). A failure is reported with the most telling line of
the children's output (the first rank's error, or out-of-memory), not torchrun's
summary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

__all__ = ["torchrun_command", "run_torchrun", "error_line", "parse_max_rel_grad_diff", "TorchrunFailure"]

# The driver's own single-process rendezvous must not leak into the children.
_DRIVER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
               "GROUP_RANK", "TORCHELASTIC_RUN_ID")


class TorchrunFailure(RuntimeError):
    """A torchrun group that exited non-zero or timed out; the message is one line."""


def torchrun_command(script: Path, config: Path, overrides: list[str], *, nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={port}", str(script), "--config", str(config), *overrides]


_NOISE = ("ChildFailedError", "torch.distributed.elastic", "error_file", "traceback :", "To enable traceback")


def error_line(output: str) -> str:
    """The line that says what went wrong in a failed group's combined output."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "out of memory" in ln.lower():
            return f"out of memory: {ln[-300:]}"
    pattern = re.compile(r"^(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception|Failure)\b.*")
    for ln in lines:  # the first rank's exception, before torchrun's summary
        if pattern.match(ln) and not any(n in ln for n in _NOISE):
            return ln[-300:]
    return lines[-1][-300:] if lines else "no output"


def parse_max_rel_grad_diff(stdout: str) -> Optional[float]:
    found = re.findall(r"max_rel_grad_diff=([0-9.eE+\-naif]+)", stdout)
    return float(found[-1]) if found else None


def run_torchrun(cmd: list[str], *, cwd: Path, timeout_s: float, log_path: Path) -> str:
    """Run the group; return its stdout. Raise TorchrunFailure with one line on failure."""
    env = {k: v for k, v in os.environ.items() if k not in _DRIVER_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        log_path.write_text(" ".join(cmd) + "\n\n" + out)
        raise TorchrunFailure(f"timed out after {timeout_s:.0f} s (log: {log_path})") from None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(" ".join(cmd) + f"\n\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise TorchrunFailure(f"exit {proc.returncode}: {error_line(proc.stdout + chr(10) + proc.stderr)}")
    return proc.stdout
