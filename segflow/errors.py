"""One exception hierarchy for segflow.

Every class also subclasses the builtin that callers would expect (``ValueError`` for bad
values, ``OSError`` for unreadable files), so ``except ValueError`` keeps working. Messages
follow one rule: *what* was wrong, *the value* received, and *what to do*.

Examples
--------
>>> try:
...     raise ConfigError("chunk must be > 0, got 0: pass --chunk 512")
... except ValueError as err:
...     print(err)
chunk must be > 0, got 0: pass --chunk 512
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LabelError",
    "RegionError",
    "SegflowError",
    "SourceError",
    "StoreError",
]


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose."""


class ConfigError(SegflowError, ValueError):
    """A configuration or parameter value is invalid."""


class SourceError(SegflowError, OSError):
    """An input image cannot be opened or read."""


class LabelError(SegflowError, ValueError):
    """Labels do not fit the image or the class table."""


class StoreError(SegflowError, OSError):
    """A scene store is missing, incomplete or does not match what is asked of it."""


class RegionError(SegflowError, ValueError):
    """A requested region is empty or lies outside the image."""


class CheckpointError(SegflowError, ValueError):
    """A model checkpoint is missing, unsafe or inconsistent."""
