"""Load a tokenizer from local files (never from the network); the ChatML fallback template.

JSONL samples given as ``{"text": ...}``, ``{"prompt": ..., "response": ...}`` or
``{"messages": [...]}`` need a tokenizer; ``{"input_ids": [...]}`` need none. A tokenizer
is given as a directory the way Hugging Face model repositories ship it, or as the path
of its ``tokenizer.json``::

    qwen2.5-7b/
      tokenizer.json          the tokenizer itself (required)
      tokenizer_config.json   eos_token, bos_token, ..., chat_template (optional)
      chat_template.jinja     the chat template in its own file (newer repositories)
      special_tokens_map.json named special tokens (older repositories)

    tok = load_local_tokenizer("checkpoints/qwen2.5-7b")
    tok.tokenizer.encode("hello world", add_special_tokens=False).ids  # [14990, 1879]
    tok.eos_token, tok.chat_template is not None                       # "<|im_end|>", True

A path to ``tokenizer.json`` reads the other files from the same directory, so
``data.tokenizer=ckpt/tokenizer.json`` and ``data.tokenizer=ckpt`` are the same tokenizer.
:func:`load_tokenizer` returns the bare :class:`tokenizers.Tokenizer` only.

There is deliberately no ``from_pretrained`` path: a training run must not depend on a
hub download that may change or be unreachable from a compute node.

Fallback chat template (ChatML, as used by Qwen), for a tokenizer without its own
``chat_template`` (the model's own template is rendered by ``chunkflow.data.chat_template``). ``{"messages": [{"role": "user", "content":
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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from chunkflow.config.errors import UserError

__all__ = [
    "TokenizerError",
    "ChatFormatError",
    "ChatTemplate",
    "LocalTokenizer",
    "load_tokenizer",
    "load_local_tokenizer",
    "check_messages",
    "ROLES",
    "SPECIAL_TOKEN_NAMES",
]

ROLES = ("system", "user", "assistant", "tool")
# The named special tokens a chat template sees (Hugging Face passes the same names).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class TokenizerError(UserError):
    """The configured tokenizer cannot be loaded; the message names the setting."""


class ChatFormatError(ValueError):
    """A ``messages`` list that cannot be rendered; the message says what is wrong."""


@dataclass
class LocalTokenizer:
    """A tokenizer with what its ``tokenizer_config.json`` says about it.

    ``special_tokens`` maps the names of :data:`SPECIAL_TOKEN_NAMES` that are set to their
    text, e.g. ``{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}``.
    """

    tokenizer: Tokenizer
    chat_template: Optional[str] = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the path it was loaded from, for messages

    @property
    def eos_id(self) -> Optional[int]:
        """Id of ``eos_token``, or None when the tokenizer names none (or lacks it)."""
        eos = self.special_tokens.get("eos_token")
        return self.tokenizer.token_to_id(eos) if eos else None


def load_local_tokenizer(path: str | Path, *, setting: str = "data.tokenizer") -> LocalTokenizer:
    """Load the tokenizer directory ``path`` (or its ``tokenizer.json``) with its config."""
    tokenizer = load_tokenizer(path, setting=setting)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    config = _read_json(folder / "tokenizer_config.json", setting, path)
    special = _read_json(folder / "special_tokens_map.json", setting, path)
    names = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = _token_text(config.get(name, special.get(name)))
        if value:
            names[name] = value
    eos = names.get("eos_token")
    if eos and tokenizer.token_to_id(eos) is None:
        raise TokenizerError(
            f"{setting}={str(path)!r}: eos_token {eos!r} of {folder / 'tokenizer_config.json'} "
            "is not a token of tokenizer.json; fix the config or give matching files"
        )
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template: object = template_file.read_text(encoding="utf-8")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(
            f"{setting}={str(path)!r}: chat_template in {folder / 'tokenizer_config.json'} is "
            f"neither a string nor a list holding a 'default' template"
        )
    return LocalTokenizer(tokenizer, template or None, names, str(path))


def _read_json(file: Path, setting: str, path: str | Path) -> dict:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{setting}={str(path)!r}: cannot parse {file}: {exc}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{setting}={str(path)!r}: {file} is not a JSON object")
    return value


def _token_text(value: object) -> Optional[str]:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


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
        check_messages(messages)
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


def check_messages(messages: object) -> None:
    """Raise :class:`ChatFormatError` unless ``messages`` is a list of role/content
    objects (role one of :data:`ROLES`, content a string) with an assistant turn."""
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
