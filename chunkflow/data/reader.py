"""Read a JSONL file of training samples into shifted :class:`Sample` objects.

One sample per line (blank lines are skipped), in one of the record formats of
:mod:`chunkflow.data.formats`::

    {"input_ids": [1, 17, 5, 9], "loss_mask": [0, 0, 1, 1]}    # or "labels", or neither
    {"text": "The quick brown fox"}                             # needs a tokenizer
    {"prompt": "2 + 2 =", "response": " 4"}                     # needs a tokenizer
    {"messages": [{"role": "user", "content": "Hi"},            # needs a tokenizer
                  {"role": "assistant", "content": "Hello!"}]}

Each line gives a raw token sequence ``d_0 .. d_n`` and a target mask: ``target[i]`` says
whether token i is trained on (predicted). The sample is then shifted for next-token
prediction::

    d          1  17   5   9
    target     0   0   1   1
    input_ids  1  17   5            = d[:-1]
    labels    17   5   9            = d[1:]
    loss_mask  0   1   1            = target[1:]   (target[0] can never be predicted)

A sample longer than ``max_seq_len`` positions (``len(Sample)``, i.e. n) is handled by
the ``overlong`` policy (setting ``data.overlong``): ``"error"`` stops with the file,
line and length; ``"truncate"`` keeps the first ``max_seq_len`` positions (if that cuts
off every loss token the sample is dropped and counted as ``dropped_no_loss``);
``"drop"`` skips it. Every problem with the data itself raises :class:`DataError`
naming ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tokenizers import Tokenizer

from chunkflow.config.schema import OVERLONG
from chunkflow.data.errors import DataError
from chunkflow.data.formats import FORMAT_KEYS, RecordEncoder, check_vocab
from chunkflow.data.tokenizer import LocalTokenizer
from chunkflow.data.types import Sample

__all__ = ["DataError", "ReadStats", "read_jsonl", "FORMAT_KEYS"]


@dataclass
class ReadStats:
    """What :func:`read_jsonl` saw. ``samples`` = read - dropped - dropped_no_loss."""

    path: str = ""
    lines: int = 0  # lines in the file, blank ones included
    skipped_blank: int = 0
    read: int = 0  # samples parsed (non-blank lines)
    truncated: int = 0  # overlong samples cut to max_seq_len (and kept)
    dropped: int = 0  # overlong samples skipped (overlong="drop")
    dropped_no_loss: int = 0  # truncated samples whose loss tokens were all cut off
    samples: int = 0  # samples returned
    tokens: int = 0  # positions (len(Sample)) summed over the returned samples
    loss_tokens: int = 0  # loss_mask summed over the returned samples
    max_len: int = 0  # longest returned sample

    def summary(self) -> str:
        """One line for the log, e.g. ``chat.jsonl: 1000 samples (1002 lines, ...)``."""
        text = (
            f"{self.path}: {self.samples} samples, {self.tokens:,} tokens "
            f"({self.loss_tokens:,} with loss), longest {self.max_len}; "
            f"{self.lines} lines, {self.skipped_blank} blank, {self.read} read, "
            f"{self.truncated} truncated, {self.dropped} dropped overlong"
        )
        if self.dropped_no_loss:
            text += f", {self.dropped_no_loss} dropped (no loss token left after truncation)"
        return text


def read_jsonl(
    path: str | Path,
    *,
    max_seq_len: int,
    vocab_size: int,
    overlong: str = "error",
    tokenizer: Union[LocalTokenizer, Tokenizer, None] = None,
    first_sample_id: int = 0,
    encoder: Optional[RecordEncoder] = None,
) -> tuple[list[Sample], ReadStats]:
    """Read every sample of ``path``; sample ids count up from ``first_sample_id``.

    Lines are encoded by ``encoder``, else by ``RecordEncoder(tokenizer)``.
    Raises :class:`DataError` on the first bad line (see the module docstring).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r} is not one of {', '.join(OVERLONG)}")
    if max_seq_len < 1 or vocab_size < 1:
        raise ValueError(f"max_seq_len={max_seq_len} and vocab_size={vocab_size} must be >= 1")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    if encoder is None:
        encoder = RecordEncoder(tokenizer)
    stats = ReadStats(path=str(path))
    samples: list[Sample] = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is named by its number
        for lineno, raw in enumerate(f, start=1):
            stats.lines = lineno
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if not line.strip():
                stats.skipped_blank += 1
                continue
            tokens, target = encoder.encode(line, where)
            check_vocab(tokens, where, vocab_size)
            stats.read += 1
            num_positions = len(tokens) - 1
            if num_positions > max_seq_len:
                if overlong == "error":
                    raise DataError(
                        f"{where}: sample has {num_positions} positions after shifting "
                        f"({len(tokens)} tokens), more than max_seq_len={max_seq_len}; set "
                        "data.overlong=truncate or data.overlong=drop, or raise "
                        "data.max_seq_len"
                    )
                if overlong == "drop":
                    stats.dropped += 1
                    continue
                stats.truncated += 1
                tokens, target = tokens[: max_seq_len + 1], target[: max_seq_len + 1]
                if not target[1:].any():
                    stats.dropped_no_loss += 1
                    continue
            sample = _shift(tokens, target, first_sample_id + len(samples))
            samples.append(sample)
            stats.tokens += len(sample)
            stats.loss_tokens += sample.num_loss_tokens
            stats.max_len = max(stats.max_len, len(sample))
    stats.samples = len(samples)
    return samples, stats


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; "
            "chunkflow reads JSONL as UTF-8 (re-encode the file)"
        ) from None


def _shift(tokens: np.ndarray, target: np.ndarray, sample_id: int) -> Sample:
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    return Sample(
        sample_id=sample_id,
        input_ids=tokens[:-1].copy(),
        labels=tokens[1:].copy(),
        loss_mask=target[1:].astype(np.float32),
    )
