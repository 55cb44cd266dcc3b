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

import errno
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LabelError",
    "RegionError",
    "SegflowError",
    "SourceError",
    "StoreError",
    "describe_failure",
    "option",
    "options_named",
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


@dataclass(frozen=True)
class _Naming:
    """How messages name options: as command-line flags or as keys of a YAML section."""

    style: Literal["cli", "yaml"] = "cli"
    prefix: str = ""  # YAML: the section, e.g. "segment."
    flags: Mapping[str, str] = field(default_factory=dict)  # CLI: field -> flag, if not --name


_NAMING: ContextVar[_Naming | None] = ContextVar("segflow_option_naming", default=None)
_UNSET = object()


def option(name: str, value: object = _UNSET, *, flag: str | None = None) -> str:
    """An option, or an option set to ``value``, as the user gives it: ``--tile`` and
    ``--tile 512`` on a command line (the default), ``segment.tile`` and ``segment.tile: 512``
    in a pipeline YAML (inside :func:`options_named`).

    Library messages name options through this, so one check serves every surface. ``flag``
    is the command line's flag where it is not ``--name`` (the command's own mapping, given
    to :func:`options_named`, wins).

    Examples
    --------
    >>> option("batch_size", 8)
    '--batch-size 8'
    >>> with options_named("yaml", prefix="segment."):
    ...     option("batch_size", 8)
    'segment.batch_size: 8'
    >>> option("window", (0, 0, 256, 256))
    '--window 0 0 256 256'
    """
    naming = _NAMING.get() or _Naming()
    items = [str(v) for v in value] if isinstance(value, tuple | list) else None
    if naming.style == "yaml":
        key = naming.prefix + name
        text = f"[{', '.join(items)}]" if items is not None else str(value)
        return key if value is _UNSET else f"{key}: {text}"
    shown = naming.flags.get(name) or flag or "--" + name.replace("_", "-")
    text = " ".join(items) if items is not None else str(value)
    return shown if value is _UNSET else f"{shown} {text}"


@contextmanager
def options_named(
    style: Literal["cli", "yaml"], *, prefix: str = "", flags: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Within the block, :func:`option` names options in ``style``."""
    token = _NAMING.set(_Naming(style, prefix, dict(flags or {})))
    try:
        yield
    finally:
        _NAMING.reset(token)


# what to do about an operating-system error, by errno
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space there or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space there or write elsewhere",
    errno.EROFS: "read-only file system: write to a writable directory",
    errno.EACCES: "permission denied: fix the permissions or choose another path",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EISDIR: "is a directory: give a file path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}
# GDAL and some C libraries report these only in their message text
_TEXT_ADVICE = {
    "no space left": errno.ENOSPC,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def describe_failure(err: BaseException) -> tuple[str, int]:
    """One line for a failure and the exit status a command ends with.

    segflow's own errors carry their message (status 2); operating-system errors (a full
    disk, a read-only or missing directory, permissions), also when wrapped by a library,
    and running out of memory get what happened, the path and what to do (status 2); any
    other exception is an internal error (status 1), to be reported with ``--debug``'s
    traceback.

    Examples
    --------
    >>> describe_failure(OSError(28, "No space left on device", "/data/out.tif"))
    ("no space left on the device: free space there or write elsewhere: '/data/out.tif'", 2)
    """
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, SegflowError):
            return _first_line(e), 2
    for e in chain:
        if isinstance(e, MemoryError):
            return (
                "out of memory: lower the tile, batch or chunk size, or run on a machine with "
                "more memory",
                2,
            )
        code = getattr(e, "errno", None)
        if code is None:
            low = str(e).lower()
            code = next((c for text, c in _TEXT_ADVICE.items() if text in low), None)
        if code in _OS_ADVICE:
            where = getattr(e, "filename", None)
            suffix = f": {str(where)!r}" if where else f" ({_first_line(e)})"
            return _OS_ADVICE[code] + suffix, 2
        if isinstance(e, OSError):
            return f"{_first_line(e)}: check the path and that it is readable", 2
    return (
        f"internal error ({type(err).__name__}: {_first_line(err)}): run again with --debug "
        "for the traceback and report it",
        1,
    )
