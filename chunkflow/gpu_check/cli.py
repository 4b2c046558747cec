"""Command line of ``scripts/gpu_check.py`` (kept here so tests can import it)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from chunkflow.gpu_check.checks import Options, build_checks
from chunkflow.gpu_check.harness import FAIL, format_header, format_line, run_checks, write_json

__all__ = ["main", "parse_args"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=(
        "One-command GPU check of chunkflow: versions and backends, attention parity against "
        "fp64, gradient equivalence, a short Qwen2.5-7B-width training run with checkpoint/resume "
        "and the Megatron schedule, and (2+ GPUs) tensor/pipeline parallel over NCCL."))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same checks scaled down for CPU (fp32/fp64, tiny model, gloo); GPU-only ones SKIP")
    p.add_argument("--out", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    p.add_argument("--workdir", default="", help="where runs, checkpoints and logs go (default: a temp dir, "
                   "removed at the end unless --keep); the 7B-width checkpoint needs ~25 GB of disk")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--layers", type=int, default=2, help="layers of the Qwen2.5-7B-width model (default 2)")
    p.add_argument("--seq-len", type=int, default=32768, help="longest sample (default 32768)")
    p.add_argument("--chunk-size", type=int, default=8192, help="ChunkFlow chunk size C (default 8192)")
    p.add_argument("--k", type=int, default=2, help="ChunkFlow K (default 2)")
    p.add_argument("--steps", type=int, default=4, help="training steps (default 4; checkpoint at 2)")
    p.add_argument("--megatron-recompute", default="full", choices=("none", "selective", "full"),
                   help="recompute of the Megatron-schedule run (default full, what it needs at 32K)")
    p.add_argument("--no-multi-gpu", action="store_true", help="skip the torchrun TP/PP part")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of one GPU for MFU (default: looked up from the GPU name)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per torchrun group (default 1200)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only checks whose name contains one")
    return p.parse_args(argv)


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:  # CPU even on a GPU machine: hide the devices before CUDA starts
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run with --cpu-smoke for the "
              "CPU version of the checks.", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chunkflow_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts = Options(cpu_smoke=args.cpu_smoke, workdir=workdir.resolve(), repo_root=REPO_ROOT,
                   layers=args.layers, seq_len=args.seq_len, chunk_size=args.chunk_size, k=args.k,
                   steps=args.steps, save_at=max(1, args.steps // 2), megatron_recompute=args.megatron_recompute,
                   multi_gpu=not args.no_multi_gpu, timeout_s=args.timeout, peak_tflops=args.peak_tflops).scaled()
    checks, state = build_checks(opts)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        checks = [c for c in checks if any(w in c.name for w in wanted)]

    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    print(f"chunkflow gpu_check ({mode}): work directory {workdir}", flush=True)
    print(format_header(), flush=True)
    t0 = time.perf_counter()
    try:
        results = run_checks(checks, on_result=lambda r: print(format_line(r), flush=True))
    finally:
        try:
            from chunkflow.parallel.distributed import destroy_distributed

            if state.ctx is not None:
                destroy_distributed()
        except Exception:  # noqa: BLE001
            pass
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    total = time.perf_counter() - t0
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {total:.0f} s", flush=True)
    meta = {"mode": mode, "argv": sys.argv[1:] if argv is None else argv, "git_commit": _git_commit(),
            "seconds": total, "options": {k: str(v) for k, v in opts.__dict__.items()},
            "environment": state.env}
    write_json(args.out, results, meta)
    print(f"report: {Path(args.out).resolve()}", flush=True)
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.keep or args.workdir:
        print(f"kept: {workdir} (runs, checkpoints, torchrun logs)", flush=True)
    return 1 if any(r.status == FAIL for r in results) else 0
