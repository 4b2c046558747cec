"""The error types every layer raises for bad input (their own module so any module can
raise them without importing the loader).

:class:`UserError` is the base of every error caused by what the user gave (config,
data, tokenizer, Hugging Face directory, checkpoint, launch layout): its message is one
line that names the culprit (key, ``file:line``, path and what differs) and the fix.
Entry points print that line once and exit with :data:`USER_ERROR_EXIT` (2) instead of
a traceback; see ``chunkflow.train.errors`` and docs/errors.md.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "USER_ERROR_EXIT"]

USER_ERROR_EXIT = 2  # like argparse: the input is wrong, nothing crashed


class UserError(ValueError):
    """Bad input from the user; the message (one line) names the culprit and the fix."""


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the key and the fix."""
