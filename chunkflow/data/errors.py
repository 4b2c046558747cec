"""The error for a bad sample (its own module so the reader and the record formats share it)."""

from __future__ import annotations

from chunkflow.config.errors import UserError

__all__ = ["DataError"]


class DataError(UserError):
    """A sample that cannot be used; the message starts with ``file:line``."""
