"""The record formats of a JSONL line, encoded to raw tokens and a target mask.

One JSON object per line, in exactly one of these formats (other keys, such as ``"id"``,
are ignored)::

    {"input_ids": [1, 17, 5, 9]}                                 every token trained
    {"input_ids": [1, 17, 5, 9], "loss_mask": [0, 0, 1, 1]}     1 = trained
    {"input_ids": [1, 17, 5, 9], "labels": [-100, -100, 5, 9]}  Hugging Face labels
    {"text": "The quick brown fox"}                              needs a tokenizer
    {"prompt": "2 + 2 =", "response": " 4"}                      needs a tokenizer
    {"messages": [{"role": "user", "content": "Hi"},             needs a tokenizer
                  {"role": "assistant", "content": "Hello!"}]}

:meth:`RecordEncoder.encode` returns the raw tokens ``d_0 .. d_n`` and ``target``:
``target[i]`` says whether token i is trained on, i.e. predicted from tokens ``< i``
(the reader then shifts: labels = d[1:], loss_mask = target[1:]).

- ``labels`` are aligned with ``input_ids`` as in Hugging Face (the model shifts, not
  the data): ``labels[i]`` is ``input_ids[i]`` where token i is trained and -100 where it
  is not. Any other value is an error (it would train a token that is not in the text).
- ``text`` is encoded with the tokenizer's own special tokens (e.g. Llama 3's
  ``<|begin_of_text|>``), then ``eos_token`` is appended when the tokenizer names one
  (``tokenizer_config.json``) and the text does not already end with it. Every token
  is trained.
- ``prompt``/``response`` is plain concatenation, no chat template: the prompt encoded
  like ``text`` (without EOS), the response encoded on its own with no special tokens,
  then ``eos_token`` when there is one. Only the response and its EOS are trained; the
  boundary always falls between tokens. Chat models want ``messages`` instead.
- ``messages`` are rendered with the tokenizer's ``chat_template``
  (:mod:`chunkflow.data.chat_template`), training every assistant turn; a tokenizer
  without one falls back to ChatML (:class:`chunkflow.data.tokenizer.ChatTemplate`) with
  a warning, once per process.

Every bad record raises :class:`DataError` naming ``where`` (``file:line``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tokenizers import Tokenizer

from chunkflow.data.chat_template import JinjaChatTemplate
from chunkflow.data.errors import DataError
from chunkflow.data.tokenizer import (
    ChatFormatError,
    ChatTemplate,
    LocalTokenizer,
    load_local_tokenizer,
)

__all__ = ["RecordEncoder", "FORMAT_KEYS", "check_vocab"]

logger = logging.getLogger(__name__)

FORMAT_KEYS = ("input_ids", "text", "prompt", "messages")
# Keys that only go with one format.
COMPANIONS = {"loss_mask": "input_ids", "labels": "input_ids", "response": "prompt"}
IGNORE_INDEX = -100
_warned_chatml = False


class RecordEncoder:
    """Encodes JSONL lines; construct once per tokenizer (picklable for worker processes).

    >>> enc = RecordEncoder.from_path("checkpoints/llama-3-8b-instruct")  # or None
    >>> tokens, target = enc.encode('{"text": "hi"}', "data.jsonl:1")
    >>> tokens.dtype, target.dtype      # int64 (n,), bool (n,)
    """

    def __init__(self, tokenizer: Union[LocalTokenizer, Tokenizer, None]) -> None:
        if isinstance(tokenizer, Tokenizer):  # bare tokenizer.json: no EOS, no template
            tokenizer = LocalTokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._chat: Union[JinjaChatTemplate, ChatTemplate, None] = None
        self._eos: Optional[int] = None
        if tokenizer is not None:
            tok = tokenizer.tokenizer
            self._eos = tokenizer.eos_id
            if tokenizer.chat_template:
                self._chat = JinjaChatTemplate(
                    tokenizer.chat_template, tok, tokenizer.special_tokens
                )
            else:
                self._chat = ChatTemplate(tok)

    @classmethod
    def from_path(
        cls, path: Union[str, Path, None], *, setting: str = "data.tokenizer"
    ) -> "RecordEncoder":
        """Load the tokenizer at ``path`` (directory or ``tokenizer.json``); None/"" = none."""
        return cls(load_local_tokenizer(path, setting=setting) if path else None)

    def encode(self, line: str, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw tokens ``(n,) int64`` and target mask ``(n,) bool`` of one JSONL line.

        Guarantees n >= 2 and a target after token 0; the vocabulary range is checked by
        :func:`check_vocab` (it depends on the model).
        """
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        key = _format_key(obj, where)
        if key == "input_ids":
            tokens, target = _input_ids(obj, where)
        else:
            if self.tokenizer is None:
                raise DataError(
                    f'{where}: "{key}" samples need a tokenizer; set data.tokenizer to a local '
                    "tokenizer directory or tokenizer.json (or give input_ids)"
                )
            if key == "text":
                tokens, target = self._text(obj, where)
            elif key == "prompt":
                tokens, target = self._prompt_response(obj, where)
            else:
                tokens, target = self._messages(obj["messages"], where)
        _check_record(tokens, target, where)
        return tokens, target

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=special).ids

    def _text(self, obj: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self._ids(_string(obj, "text", where), True)
        if self._eos is not None and (not ids or ids[-1] != self._eos):
            ids.append(self._eos)
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)

    def _prompt_response(self, obj: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        if "response" not in obj:
            raise DataError(f'{where}: "prompt" needs a "response" (the tokens that are trained)')
        prompt = self._ids(_string(obj, "prompt", where), True)
        response = self._ids(_string(obj, "response", where), False)
        if not response:
            raise DataError(f'{where}: "response" is empty; nothing would be trained')
        if self._eos is not None:
            response.append(self._eos)
        tokens = np.asarray(prompt + response, dtype=np.int64)
        target = np.zeros(len(tokens), dtype=bool)
        target[len(prompt):] = True
        return tokens, target

    def _messages(self, messages: object, where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            rendered = self._chat.render(messages)
        except ChatFormatError as exc:
            raise DataError(f"{where}: {exc}") from None
        # Warned after the checks, so a bad line's error stays one line.
        if isinstance(self._chat, ChatTemplate):
            _warn_chatml(self.tokenizer.source)
        return rendered


def check_vocab(tokens: np.ndarray, where: str, vocab_size: int) -> None:
    """Raise :class:`DataError` if a token id is outside ``[0, vocab_size)``."""
    outside = (tokens < 0) | (tokens >= vocab_size)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{where}: token id {int(tokens[i])} at position {i} is outside "
            f"[0, {vocab_size}) (model.vocab_size={vocab_size})"
        )


def _warn_chatml(source: str) -> None:
    global _warned_chatml
    if not _warned_chatml:
        _warned_chatml = True
        logger.warning(
            "tokenizer %s has no chat_template (tokenizer_config.json or chat_template.jinja): "
            "rendering messages with the ChatML fallback (<|im_start|>role ... <|im_end|>); "
            "this is wrong for models trained with another template", source or "(in memory)"
        )


def _format_key(obj: dict, where: str) -> str:
    present = [key for key in FORMAT_KEYS if key in obj]
    if not present:
        found = ", ".join(sorted(obj)) or "none"
        raise DataError(
            f"{where}: none of the known keys {', '.join(FORMAT_KEYS)} (found: {found})"
        )
    if len(present) > 1:
        raise DataError(f"{where}: has {' and '.join(present)}; give exactly one per line")
    key = present[0]
    for companion, owner in COMPANIONS.items():
        if companion in obj and owner != key:
            raise DataError(f'{where}: "{companion}" only goes with "{owner}", not "{key}"')
    return key


def _string(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    return value


def _input_ids(obj: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = _int_array(obj["input_ids"], "input_ids", where)
    if "loss_mask" in obj and "labels" in obj:
        raise DataError(f'{where}: has "loss_mask" and "labels"; give at most one of them')
    if "labels" in obj:
        return tokens, _labels_target(obj["labels"], tokens, where)
    if "loss_mask" in obj:
        return tokens, _mask_array(obj["loss_mask"], len(tokens), where)
    return tokens, np.ones(len(tokens), dtype=bool)


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


def _labels_target(values: object, tokens: np.ndarray, where: str) -> np.ndarray:
    labels = _int_array(values, "labels", where)
    if len(labels) != len(tokens):
        raise DataError(
            f'{where}: "labels" has {len(labels)} values but "input_ids" has {len(tokens)}; '
            "they must have the same length (labels are aligned with input_ids, as in "
            "Hugging Face: the model shifts them)"
        )
    target = labels != IGNORE_INDEX
    wrong = target & (labels != tokens)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise DataError(
            f'{where}: "labels"[{i}] = {int(labels[i])} but "input_ids"[{i}] = {int(tokens[i])}; '
            "labels must equal input_ids where trained and be -100 elsewhere (aligned, not "
            "shifted, as in Hugging Face)"
        )
    return target


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


def _check_record(tokens: np.ndarray, target: np.ndarray, where: str) -> None:
    if len(tokens) < 2:
        raise DataError(
            f"{where}: empty sample: {len(tokens)} token(s); a sample needs at least 2 "
            "(one input and its label)"
        )
    if not target[1:].any():
        raise DataError(
            f"{where}: no loss token: nothing in this sample is trained on (loss_mask is 0 "
            "everywhere after the first token, which is never a label)"
        )
