"""Read a JSONL file of training samples into shifted :class:`Sample` objects.

One sample per line, in one of three formats (blank lines are skipped; other keys on a
line, such as ``"id"``, are ignored)::

    {"input_ids": [1, 17, 5, 9], "loss_mask": [0, 0, 1, 1]}    # loss_mask optional
    {"text": "The quick brown fox"}                             # needs a tokenizer
    {"messages": [{"role": "user", "content": "Hi"},            # needs a tokenizer
                  {"role": "assistant", "content": "Hello!"}]}

Each line gives a raw token sequence ``d_0 .. d_n`` and a target mask: ``target[i]`` says
whether token i is trained on (predicted). ``loss_mask`` gives it for ``input_ids``
(all ones when absent), ``text`` trains every token, and ``messages`` trains the
assistant turns only (template in ``chunkflow.data.tokenizer``). The sample is then
shifted for next-token prediction::

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from chunkflow.config.errors import UserError
from chunkflow.config.schema import OVERLONG
from chunkflow.data.tokenizer import ChatFormatError, ChatTemplate
from chunkflow.data.types import Sample

__all__ = ["DataError", "ReadStats", "read_jsonl", "FORMAT_KEYS"]

FORMAT_KEYS = ("input_ids", "text", "messages")


class DataError(UserError):
    """A sample that cannot be used; the message starts with ``file:line``."""


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
    tokenizer: Optional[Tokenizer] = None,
    first_sample_id: int = 0,
) -> tuple[list[Sample], ReadStats]:
    """Read every sample of ``path``; sample ids count up from ``first_sample_id``.

    Raises :class:`DataError` on the first bad line (see the module docstring).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r} is not one of {', '.join(OVERLONG)}")
    if max_seq_len < 1 or vocab_size < 1:
        raise ValueError(f"max_seq_len={max_seq_len} and vocab_size={vocab_size} must be >= 1")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    template = ChatTemplate(tokenizer) if tokenizer is not None else None
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
            tokens, target = _parse_line(line, where, tokenizer, template)
            _check_sample(tokens, target, where, vocab_size)
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


def _parse_line(
    line: str, where: str, tokenizer: Optional[Tokenizer], template: Optional[ChatTemplate]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw tokens ``(n,) int64`` and target mask ``(n,) bool`` of one JSONL line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    present = [key for key in FORMAT_KEYS if key in obj]
    if not present:
        found = ", ".join(sorted(obj)) or "none"
        raise DataError(
            f"{where}: none of the known keys {', '.join(FORMAT_KEYS)} (found: {found})"
        )
    if len(present) > 1:
        raise DataError(f"{where}: has {' and '.join(present)}; give exactly one per line")
    key = present[0]
    if key != "input_ids" and "loss_mask" in obj:
        raise DataError(f'{where}: "loss_mask" only goes with "input_ids", not "{key}"')
    if key == "input_ids":
        tokens = _int_array(obj["input_ids"], "input_ids", where)
        if "loss_mask" not in obj:
            return tokens, np.ones(len(tokens), dtype=bool)
        return tokens, _mask_array(obj["loss_mask"], len(tokens), where)
    if tokenizer is None or template is None:
        raise DataError(
            f'{where}: "{key}" samples need a tokenizer; set data.tokenizer to a local '
            "tokenizer.json (or give input_ids)"
        )
    if key == "text":
        if not isinstance(obj["text"], str):
            raise DataError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        tokens = np.asarray(tokenizer.encode(obj["text"]).ids, dtype=np.int64)
        return tokens, np.ones(len(tokens), dtype=bool)
    try:
        return template.render(obj["messages"])
    except ChatFormatError as exc:
        raise DataError(f"{where}: {exc}") from None


def _int_array(values: object, name: str, where: str) -> np.ndarray:
    bad = DataError(f'{where}: "{name}" must be a flat list of integer token ids')
    if not isinstance(values, list):
        raise bad
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError):
        raise bad from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise bad
    return array.astype(np.int64, copy=False)


def _mask_array(values: object, length: int, where: str) -> np.ndarray:
    bad = DataError(f'{where}: "loss_mask" must be a flat list of 0/1 values')
    if not isinstance(values, list):
        raise bad
    if len(values) != length:
        raise DataError(
            f'{where}: "loss_mask" has {len(values)} values but "input_ids" has {length}; '
            "they must have the same length"
        )
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError):
        raise bad from None
    if array.ndim != 1 or (length and array.dtype.kind not in "biuf"):
        raise bad
    not_binary = (array != 0) & (array != 1)
    if not_binary.any():
        i = int(np.flatnonzero(not_binary)[0])
        raise DataError(f'{where}: "loss_mask"[{i}] = {values[i]!r}; only 0 and 1 are allowed')
    return array.astype(bool)


def _check_sample(tokens: np.ndarray, target: np.ndarray, where: str, vocab_size: int) -> None:
    if len(tokens) < 2:
        raise DataError(
            f"{where}: empty sample: {len(tokens)} token(s); a sample needs at least 2 "
            "(one input and its label)"
        )
    outside = (tokens < 0) | (tokens >= vocab_size)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{where}: token id {int(tokens[i])} at position {i} is outside "
            f"[0, {vocab_size}) (model.vocab_size={vocab_size})"
        )
    if not target[1:].any():
        raise DataError(
            f"{where}: no loss token: nothing in this sample is trained on (loss_mask is 0 "
            "everywhere after the first token, which is never a label)"
        )
