"""Render ``messages`` with the model's own chat template (the Jinja text of its
``tokenizer_config.json``) and find the tokens that carry loss.

The template is rendered with jinja2 the way Hugging Face's ``apply_chat_template``
renders it (sandboxed, ``trim_blocks``/``lstrip_blocks``, the loop-controls extension,
``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, the named
special tokens as variables, ``add_generation_prompt=False``); the rendered text is then
encoded once with ``add_special_tokens=False``. transformers is not needed, and the ids
equal what ``AutoTokenizer.from_pretrained(dir).apply_chat_template(messages)`` returns
(``tests/test_chat_templates.py`` checks this for Qwen2.5's and Llama 3's templates).

Which tokens are trained (the *target* mask), for Llama 3::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>
                                                 TTTTTTTTTTTTTTTTTT

1. If the template marks assistant text with ``{% generation %} ... {% endgeneration %}``,
   the marked characters are the target.
2. Otherwise by prefixes: for each assistant message i, render ``messages[:i]`` with the
   generation prompt (``<|start_header_id|>assistant<|end_header_id|>\\n\\n``) and
   ``messages[:i+1]`` without it. The characters between the two ends are turn i: its
   content and end-of-turn token. Whitespace the template writes after a closing special
   token (Qwen's ``\\n`` after ``<|im_end|>``) separates turns and is not trained. Both
   renders must be prefixes of the whole conversation's render (and the first of the
   second); a template that rewrites earlier turns (e.g. drops old reasoning) breaks
   this and is refused with :class:`ChatFormatError`.

A token is a target when any of its characters is. Message content is passed to the
template as given: text in it that spells a special token (``"<|im_end|>"``) is encoded
as that token, as ``apply_chat_template`` does by default.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from chunkflow.data.tokenizer import ChatFormatError, check_messages

__all__ = ["JinjaChatTemplate", "has_generation_markers"]


def has_generation_markers(template: str) -> bool:
    """True when ``template`` uses ``{% generation %}`` blocks."""
    env = _environment()
    try:
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return any(
        isinstance(node.call, nodes.Call)
        and isinstance(node.call.node, nodes.ExtensionAttribute)
        and node.call.node.name == "_mark"
        for node in ast.find_all(nodes.CallBlock)
    )


class _GenerationMarker(Extension):
    """``{% generation %}body{% endgeneration %}``: records where ``body`` lands in the
    output while :meth:`JinjaChatTemplate._render` tracks it, else renders it as is."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        environment.extend(generation_tracking=None)  # (chunks so far, spans) while rendering

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        text = caller()
        tracking = self.environment.generation_tracking
        if tracking is not None:
            chunks, spans = tracking
            start = sum(len(c) for c in chunks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarker, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class JinjaChatTemplate:
    """A model's chat template bound to its tokenizer.

    >>> ids, target = JinjaChatTemplate(template, tok, {"eos_token": "<|im_end|>"}).render(messages)
    >>> ids.shape, target.shape     # (n,) int64, (n,) bool: target[i] = token i is trained

    Holds no compiled template when pickled (it is compiled again on first use).
    """

    def __init__(self, template: str, tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
        self.template = template
        self._tok = tokenizer
        self._variables = dict(special_tokens)
        self._compiled: Optional[jinja2.Template] = None
        self._markers = has_generation_markers(template)
        # Closing tokens: the special added tokens (a turn's whitespace after them is not trained).
        self._closers = tuple(
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None}

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.template)
            except jinja2.TemplateSyntaxError as exc:
                raise ChatFormatError(
                    f"the tokenizer's chat_template does not parse: {exc.message} "
                    f"(template line {exc.lineno})"
                ) from None
        return self._compiled

    def render_text(self, messages: list, *, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (no tokenization)."""
        return self._render(messages, add_generation_prompt, None)

    def _render(self, messages: list, add_generation_prompt: bool, spans: Optional[list]) -> str:
        template = self._template()
        env = template.environment
        chunks: list[str] = []
        env.generation_tracking = (chunks, spans) if spans is not None else None
        try:
            for chunk in template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                tools=None, documents=None, **self._variables,
            ):
                chunks.append(chunk)
        except jinja2.TemplateError as exc:
            raise ChatFormatError(f"the tokenizer's chat_template failed: {exc}") from None
        finally:
            env.generation_tracking = None
        return "".join(chunks)

    def render(self, messages: object) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``(n,) int64`` and target mask ``(n,) bool`` of one conversation."""
        check_messages(messages)
        # Keys set to None are dropped, as apply_chat_template does.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # type: ignore
        if self._markers:
            spans: list[tuple[int, int]] = []
            text = self._render(messages, False, spans)
            if not spans:
                raise ChatFormatError(
                    "the chat_template has {% generation %} markers but marked nothing in this "
                    "conversation, so no token would be trained"
                )
        else:
            text = self._render(messages, False, None)
            spans = self._prefix_spans(messages, text)
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        return ids, _target_mask(encoding.offsets, spans)

    def _prefix_spans(self, messages: list, text: str) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, None)
            through = self._render(messages[: i + 1], False, None)
            if not (through.startswith(before) and text.startswith(through)):
                raise ChatFormatError(
                    f"cannot find the loss tokens of messages[{i}] (assistant): rendering "
                    f"messages[:{i}] with the generation prompt and messages[:{i + 1}] do not "
                    "give prefixes of the whole conversation's text, so this chat_template "
                    "rewrites earlier turns; use a template with {% generation %} markers, "
                    "or give the sample as input_ids with loss_mask"
                )
            end = len(through)
            trimmed = through.rstrip()
            if trimmed.endswith(self._closers) and len(trimmed) > len(before):
                end = len(trimmed)
            if end > len(before):
                spans.append((len(before), end))
        return spans


def _target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """``(n,) bool``: token t is a target when its characters overlap a span."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((o[1] for o in offsets), dtype=np.int64, count=len(offsets))
    target = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        target |= (starts < hi) & (ends > lo)
    return target
