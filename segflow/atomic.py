"""Atomic file writes: a reader sees the old file or the new one, never a part of one.

Every writer of a finished file (the exporters, stage records, fingerprints, training metrics
and curves, cached measurements) goes through :func:`atomic_output`: the content is written to
a hidden, unique temporary name in the same directory and moved into place with
:func:`os.replace` (atomic on one file system) only when it is complete. On an exception the
temporary file, and whatever a driver left beside it (GDAL's ``.aux.xml``, SQLite's
``-journal``), is removed, and an older file at the path stays as it was.

Directories built in place (scene stores, prediction stores, checkpoints) use their own
``NAME.partial`` staging instead, because they are resumed part-way.

A stdlib-only primitive, so it sits in the core beside :mod:`segflow.errors`: core value
objects (the fingerprint's JSON) write through it as well as ``io`` and the stages.

Examples
--------
>>> import tempfile
>>> out = Path(tempfile.mkdtemp()) / "a.json"
>>> _ = write_json_atomic(out, {"b": 1, "a": 2})
>>> out.read_text()
'{\\n  "a": 2,\\n  "b": 1\\n}\\n'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segflow.errors import ConfigError

__all__ = ["atomic_output", "remove_with_siblings", "write_json_atomic", "write_text_atomic"]

log = logging.getLogger(__name__)


def partial_name(final: Path) -> Path:
    """A hidden, unique name beside ``final`` that keeps its suffix (drivers pick by it)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.partial{final.suffix}")


def remove_with_siblings(tmp: Path) -> None:
    """Remove ``tmp`` and what GDAL/SQLite may leave beside it (``-journal``, ``.aux.xml``...)."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    parent = tmp.parent
    if not parent.is_dir():
        return
    for sibling in parent.glob(tmp.name + "*"):
        with contextlib.suppress(OSError):
            if sibling.is_file():
                sibling.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    Parameters
    ----------
    path
        The finished file. Its directory is created when missing.

    Yields
    ------
    pathlib.Path
        Where to write the content (same directory and suffix as ``path``).

    Raises
    ------
    ConfigError
        ``path`` is a directory.
    FileNotFoundError
        The block ended without writing the temporary file.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_output(out) as tmp:
    ...     _ = tmp.write_text("done")
    >>> out.read_text()
    'done'
    """
    final = Path(path)
    if final.is_dir():
        raise ConfigError(f"output path {str(final)!r} is a directory: give a file name")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {str(tmp)!r}")
        os.replace(tmp, final)
        log.debug("wrote %s", final)
    finally:
        remove_with_siblings(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the move); returns it."""
    with atomic_output(path) as tmp, tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_json_atomic(
    path: str | Path, doc: Any, *, indent: int | None = 2, default: Any = str
) -> Path:
    """Write ``doc`` as JSON (sorted keys, a final newline) to ``path`` atomically."""
    return write_text_atomic(
        path, json.dumps(doc, indent=indent, sort_keys=True, default=default) + "\n"
    )
