"""Every output of a command planned and checked before any work starts; one writer per output.

:func:`plan_outputs` is the one place where an entry point's output paths are checked: none is
an input (or inside an input directory), no two outputs of the run share a path, each one's
directory exists and accepts a new file, and a file already there is replaced only when it
is the run's own earlier output (recorded, see :class:`OutputRecord`) or the caller passed
``overwrite``. :func:`output_lock` makes a run the only writer of its outputs: a second run
on the same output is refused at once, naming the other; the lock is an ``flock`` held by
the process, so the kernel drops it when a run is killed and the next run takes over.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> plan = plan_outputs({"out": d / "mask.tif"}, inputs=[d / "scene.tif"])
>>> plan["out"].name
'mask.tif'
>>> with output_lock(plan["out"]):
...     pass
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from segflow.errors import ConfigError, SegflowError

__all__ = [
    "LockedError",
    "OutputRecord",
    "check_output_directory",
    "check_unlocked",
    "file_stamp",
    "output_lock",
    "plan_outputs",
    "remove_output",
    "sidecar_paths",
]


class LockedError(SegflowError, OSError):
    """Another run is writing the same output."""


@dataclass(frozen=True)
class OutputRecord:
    """The outputs an earlier run wrote, as ``{absolute path: stamp}`` (see :func:`file_stamp`).

    A file whose current stamp equals its recorded one is that run's untouched output, which
    the same command may replace; anything else at an output path is the user's. Sidecars
    (:func:`sidecar_paths`) are not stamped: they go with their file (GIS tools cache
    statistics in them), and are replaced with it.
    """

    stamps: Mapping[str, str]

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is an output recorded here and unchanged since."""
        stamp = self.stamps.get(str(path.resolve()))
        return stamp is not None and stamp == file_stamp(path)


def file_stamp(path: str | Path) -> str | None:
    """Size and modification time of a file, or the modification time of a directory written
    whole (an OME-Zarr: published by one rename); ``None`` if there is neither."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if os.path.isdir(path):
        return f"dir:{st.st_mtime_ns}"
    return f"{st.st_size}:{st.st_mtime_ns}" if os.path.isfile(path) else None


SIDECAR_SUFFIXES = (".aux.xml",)  # GDAL's PAM sidecar: e.g. the class COG's category names


def sidecar_paths(path: str | Path) -> list[Path]:
    """The files that belong to output ``path``: GDAL's PAM sidecar ``<path>.aux.xml``.

    The writer of ``path`` writes them with it (or removes them when it has none: an older
    sidecar describes the file it replaces); :func:`remove_output` removes them with it.

    >>> sidecar_paths("out/mask.tif")
    [PosixPath('out/mask.tif.aux.xml')]
    """
    p = Path(path)
    return [p.with_name(p.name + suffix) for suffix in SIDECAR_SUFFIXES]


def remove_output(path: str | Path) -> None:
    """Remove the file (or directory) ``path`` and its :func:`sidecar_paths`; missing ones
    are fine."""
    import shutil

    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    for p in (Path(path), *sidecar_paths(path)):
        if not p.is_dir():
            p.unlink(missing_ok=True)


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path))).resolve()


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_directory(name: str, path: Path) -> None:
    """The directory of ``path`` exists and a new file can be created in it (probed)."""
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(
            f"output directory does not exist: {str(parent)!r} (for {name} {str(path)!r}): "
            "create it or choose another path"
        )
    # os.access says yes to root on a read-only mount: create (and remove) a probe instead
    probe = parent / f".segflow-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise ConfigError(
            f"{name}: cannot write in {str(parent)!r} ({why.lower()}): "
            "choose a writable directory or fix its permissions"
        ) from err
    os.close(fd)
    os.unlink(probe)


def _check_existing(
    name: str,
    path: Path,
    kind: Literal["file", "dir", "tree"],
    *,
    overwrite: bool,
    owned: OutputRecord,
) -> None:
    if not os.path.lexists(path):
        return
    if kind == "tree" and not path.is_dir():
        raise ConfigError(f"{name}: {str(path)!r} is a file, not a directory: choose a new path")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{name}: {str(path)!r} is a directory, not a file: choose a file name")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(
            f"{name}: {str(path)!r} is a file, not a directory: choose a directory path"
        )
    if kind == "dir":
        return  # directories (stores, training outputs) carry their own record and checks
    if overwrite or owned.owns(path):
        return
    raise ConfigError(
        f"{name}: {str(path)!r} already exists and is not an output of this command's earlier "
        "run: pass --overwrite to replace it, or choose another path"
    )


def plan_outputs(
    outputs: Mapping[str, str | Path | None],
    *,
    inputs: Iterable[str | Path],
    overwrite: bool = False,
    record: OutputRecord | None = None,
    directories: Iterable[str] = (),
    trees: Iterable[str] = (),
) -> dict[str, Path]:
    """Check a run's outputs before it starts; returns ``{name: absolute path}`` of those given.

    Parameters
    ----------
    outputs
        ``{option name: path or None}``; the names appear in errors (e.g. ``out``,
        ``polygons``). ``None`` means the output is not wanted.
    inputs
        Files and directories the run reads: no output may be one of them or lie inside one.
    overwrite
        Replace existing files that are not recorded as this run's earlier outputs.
    record
        The outputs of this command's earlier run (see :class:`OutputRecord`).
    directories
        Names of outputs that are directories (stores, training outputs).
    trees
        Names of directory outputs written whole and replaced like files (an OME-Zarr):
        an existing one is replaced only if recorded in ``record``, or with ``overwrite``.

    Raises
    ------
    ConfigError
        An output is an input or inside one, two outputs share a path, a directory is
        missing or not writable, or an existing file would be replaced without permission.
    """
    owned = record or OutputRecord({})
    dirs = set(directories)
    ins = [_resolved(p) for p in inputs]
    plan: dict[str, Path] = {}
    for name, raw in outputs.items():
        if raw is None or raw == "":
            continue
        path = _resolved(raw)
        mine = {path, *sidecar_paths(path)}  # an output's files: it and its sidecars
        for other, taken in plan.items():
            if taken == path:
                raise ConfigError(
                    f"{other} and {name} both name {str(raw)!r}: give each output its own path"
                )
            if taken in mine or path in sidecar_paths(taken):
                raise ConfigError(
                    f"{name} {str(raw)!r} and {other} {str(taken)!r}: one is the other's "
                    "sidecar (GDAL's .aux.xml), written with it: give each output its own name"
                )
        for src in ins:
            if any(_is_within(p, src) for p in mine) or (name in dirs and _is_within(src, path)):
                raise ConfigError(
                    f"{name}: {str(raw)!r} is an input of this run ({str(src)!r}); "
                    "inputs are never written: choose another path"
                )
        _check_directory(name, path)
        kind: Literal["file", "dir", "tree"] = (
            "dir" if name in dirs else "tree" if name in set(trees) else "file"
        )
        _check_existing(name, path, kind, overwrite=overwrite, owned=owned)
        plan[name] = path
    return plan


def check_output_directory(
    name: str, path: str | Path, *, inputs: Iterable[str | Path] = ()
) -> Path:
    """Check an output directory that the run creates with its parents (e.g. training's).

    It is not a file nor an input, and its nearest existing ancestor accepts new entries.
    Returns the absolute path.
    """
    p = _resolved(path)
    if os.path.lexists(p) and not p.is_dir():
        raise ConfigError(
            f"{name}: {str(path)!r} is a file, not a directory: choose a directory path"
        )
    for src in (_resolved(i) for i in inputs):
        if _is_within(p, src) or _is_within(src, p):
            raise ConfigError(
                f"{name}: {str(path)!r} overlaps an input of this run ({str(src)!r}): "
                "choose another directory"
            )
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"{name}: {str(ancestor)!r} is a file, so {str(path)!r} cannot be created: "
            "choose another directory"
        )
    _check_directory(name, ancestor / ".probe")
    return p


# ----------------------------------------------------------------------------- locks
def lock_path(path: str | Path) -> Path:
    """The lock file of an output: ``NAME.lock`` beside it; for an object-storage URL, a
    file named after the URL in this machine's temporary directory (one run per output on
    this machine: object stores have no locks)."""
    if "://" in str(path):
        import hashlib
        import tempfile

        digest = hashlib.sha256(str(path).encode()).hexdigest()[:24]
        folder = Path(tempfile.gettempdir()) / "segflow-locks"
        folder.mkdir(exist_ok=True)
        return folder / f"{digest}.lock"
    p = _resolved(path)
    return p.with_name(p.name + ".lock")


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return (
            f"pid {info['pid']} on {info['host']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(path: str | Path) -> int:
    """Open and ``flock`` the lock file of ``path``; raises :class:`LockedError` if held."""
    import fcntl

    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(
                f"another run is writing {str(path)!r} ({_holder(lock)}): wait for it to "
                f"finish, or choose another output; a killed run's lock {str(lock)!r} is taken "
                "over automatically"
            ) from None
        # the holder before us may have removed the file after we opened it: lock the
        # file that is at the path now, or two runs could hold two different files
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_unlocked(path: str | Path) -> None:
    """Raise :class:`LockedError` now if a run holds the lock of ``path`` (takes nothing)."""
    if not os.path.exists(lock_path(path)):
        return
    with output_lock(path, record=False):
        pass


@contextlib.contextmanager
def output_lock(path: str | Path, *, record: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of output ``path`` (``NAME.lock`` beside it) for the block.

    The lock is ``flock``-ed, so it dies with its process: a lock file left by a killed
    run is simply locked again by the next one. The file holds the holder's pid, host and
    start time, for the message another run gets, and is removed on release.
    """
    fd = _acquire(path if "://" in str(path) else _resolved(path))
    lock = lock_path(path)
    try:
        if record:
            info: dict[str, Any] = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
            }
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        yield lock
    finally:
        if record:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: see _acquire
        os.close(fd)
