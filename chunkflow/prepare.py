"""Prepare JSONL data once into a memory-mapped token store: the ``prepare_data`` tool.

    python scripts/prepare_data.py --input chat.jsonl [more.jsonl ...] --tokenizer qwen/ \\
        --out data/chat_store [--workers N]

then train with ``data.path=data/chat_store``. Tokenization runs in ``--workers`` processes
(default: every core) behind a progress line; the summary gives samples, tokens, a length
histogram and what was dropped. Running it again on unchanged inputs does nothing and
says so. The store layout and its guarantees are in ``chunkflow.data.store`` and
``docs/data.md``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from chunkflow.config.errors import UserError
from chunkflow.data.prepare import PrepareSummary, prepare_store
from chunkflow.train.progress import Progress, format_duration

__all__ = ["main", "run_prepare"]


def run_prepare(inputs: list[str], *, out: str, tokenizer: str = "", workers: int = 0,
                stream: TextIO = sys.stdout, tty: Optional[bool] = None) -> PrepareSummary:
    """Prepare with a progress line (redrawn on a terminal); print the summary."""
    tty = stream.isatty() if tty is None else tty
    progress = Progress(total_steps=0, start_step=0, tty=False, stream=stream)  # its clock only
    shown = [False]

    def on_progress(lines: int, tokens: int) -> None:
        if not tty:
            return
        elapsed, _ = progress.times(0)
        rate = tokens / elapsed if elapsed > 0 else 0.0
        stream.write(f"\r{lines:>12,} lines  {tokens:>14,} tokens  {rate:>12,.0f} tokens/s  "
                     f"elapsed {format_duration(elapsed)}\033[K")
        stream.flush()
        shown[0] = True

    summary = prepare_store(inputs, out=out, tokenizer=tokenizer, workers=workers, on_progress=on_progress)
    if shown[0]:
        stream.write("\r\033[K")
    for line in summary.lines_of_text():
        print(line, file=stream)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files, stored in this order")
    parser.add_argument("--out", required=True, help="store directory to write")
    parser.add_argument("--tokenizer", default="", help="local tokenizer.json or its directory "
                        "(needed for text / messages lines)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = every core)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers={args.workers}: use 0 (every core) or a positive count")
    try:
        run_prepare(args.input, out=args.out, tokenizer=args.tokenizer, workers=args.workers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
