"""The one error type of the config layer (its own module so every config module can
raise it without importing the loader)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""
