"""Load a tokenizer from a local ``tokenizer.json`` (never from the network) and render
chat samples with a fixed ChatML-style template.

chunkflow only needs a :class:`tokenizers.Tokenizer` for JSONL samples given as
``{"text": ...}`` or ``{"messages": [...]}``; samples given as ``{"input_ids": [...]}``
need none. The file is the one Hugging Face model repositories ship, e.g.
``Qwen2.5-7B/tokenizer.json``; a directory holding such a file is accepted too::

    tok = load_tokenizer("checkpoints/qwen2.5-7b")           # .../tokenizer.json
    tok.encode("hello world", add_special_tokens=False).ids  # [14990, 1879]

There is deliberately no ``from_pretrained`` path: a training run must not depend on a
hub download that may change or be unreachable from a compute node.

Chat template (ChatML, as used by Qwen). ``{"messages": [{"role": "user", "content":
"Hi"}, {"role": "assistant", "content": "Hello!"}]}`` is rendered as::

    <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
    .......................................................TTTTTTTTTTTTTTTT..

where ``T`` marks the *target* tokens that carry loss: the content of every assistant
turn and its ``<|im_end|>``. Headers, system and user turns and the newline after each
``<|im_end|>`` are context only. ``<|im_start|>`` and ``<|im_end|>`` become single ids
when the tokenizer has them as tokens; otherwise they are tokenised as plain text.
Each piece (marker, ``role\n`` header, content, newline) is encoded separately with
``add_special_tokens=False``, so the target boundary always falls on a token boundary;
a byte-level BPE may therefore split a piece differently from encoding the whole string.
No BOS or system prompt is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chunkflow.config.errors import UserError

__all__ = ["TokenizerError", "ChatFormatError", "ChatTemplate", "load_tokenizer", "ROLES"]

ROLES = ("system", "user", "assistant")
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class TokenizerError(UserError):
    """The configured tokenizer cannot be loaded; the message names the setting."""


class ChatFormatError(ValueError):
    """A ``messages`` list that cannot be rendered; the message says what is wrong."""


def load_tokenizer(path: str | Path, *, setting: str = "data.tokenizer") -> Tokenizer:
    """Load ``path`` (a ``tokenizer.json`` file or a directory containing one).

    ``setting`` is the config key named in error messages.
    """
    if not str(path):
        raise TokenizerError(f"{setting} is empty; give the path of a local tokenizer.json")
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(
            f"{setting}={str(path)!r}: {file} does not exist; give the path of a local "
            "tokenizer.json (chunkflow never downloads tokenizers from the hub)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception subclass
        raise TokenizerError(f"{setting}={str(path)!r}: cannot parse {file}: {exc}") from exc



class ChatTemplate:
    """Renders a ``messages`` list to token ids and a per-token target mask.

    >>> ids, target = ChatTemplate(tok).render(messages)
    >>> ids.shape, target.shape     # (n,) int64, (n,) bool: target[i] = token i is trained
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        start = self._marker(IM_START)
        self._header = {role: start + self._encode(f"{role}\n") for role in ROLES}
        self._end = self._marker(IM_END)
        self._newline = self._encode("\n")

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _marker(self, marker: str) -> list[int]:
        token_id = self._tok.token_to_id(marker)
        return [token_id] if token_id is not None else self._encode(marker)

    def render(self, messages: object) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``(n,) int64`` and target mask ``(n,) bool`` of one conversation."""
        _check_messages(messages)
        ids: list[int] = []
        lengths: list[int] = []
        targets: list[bool] = []
        for message in messages:  # type: ignore[union-attr]
            is_assistant = message["role"] == "assistant"
            pieces = (
                (self._header[message["role"]], False),
                (self._encode(message["content"]), is_assistant),
                (self._end, is_assistant),
                (self._newline, False),
            )
            for piece, target in pieces:
                ids.extend(piece)
                lengths.append(len(piece))
                targets.append(target)
        mask = np.repeat(np.array(targets, dtype=bool), lengths)
        return np.asarray(ids, dtype=np.int64), mask


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(
            '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{i}] is not an object: {message!r:.60}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(
                f"messages[{i}].role={role!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(
                f"messages[{i}].content must be a string, got "
                f"{type(message.get('content')).__name__}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError(
            "no assistant turn: loss is taken only on assistant turns, so this sample "
            "would train nothing"
        )
