"""Paths and URLs alike: the few file operations the pipeline's stages need, on a local
directory or under a prefix on object storage.

A pipeline's ``work_dir`` (its stage records, scene store, checkpoints and outputs) may be a
URL. Object stores have no directories and no rename: a small document (a stage record) is
written in one PUT, which publishes it whole or not at all, and a "directory" exists when
any object lies below its prefix. :func:`local_mirror` gives the writers that need a local
directory (training: checkpoints, state, metrics, the curve) one, and uploads it after them.

Examples
--------
>>> str(join("s3://bucket/run/", "stages", "ingest.json"))
's3://bucket/run/stages/ingest.json'
>>> join("/data/run", "stages", "ingest.json")
PosixPath('/data/run/stages/ingest.json')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segflow.atomic import write_text_atomic
from segflow.io import remote

__all__ = [
    "ENV_CACHE_DIR",
    "Location",
    "cache_root",
    "cached_copy",
    "configured_cache_dir",
    "exists",
    "identity",
    "join",
    "forget_mirror",
    "local_mirror",
    "mirror_path",
    "read_text",
    "remove",
    "same",
    "sync_up",
    "write_text",
]

log = logging.getLogger(__name__)

Location = str | Path

#: Environment variable naming segflow's cache directory (``none``: keep no cache).
ENV_CACHE_DIR = "SEGFLOW_CACHE_DIR"


def configured_cache_dir() -> Path | None:
    """segflow's cache directory: ``$SEGFLOW_CACHE_DIR`` (None when it is ``none``), else
    ``$XDG_CACHE_HOME/segflow``, else ``~/.cache/segflow``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off", "0") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segflow"


def cache_root() -> Path:
    """:func:`configured_cache_dir`, or ``segflow`` in the temporary directory when the
    cache is turned off (for copies that must live somewhere while a run uses them)."""
    return configured_cache_dir() or Path(tempfile.gettempdir()) / "segflow"


#: The files a shapefile's readers need beside it.
_SHAPEFILE_PARTS = (".shx", ".dbf", ".prj", ".cpg")


def cached_copy(url: str) -> Path:
    """A local copy of the object at ``url`` (a label file), downloaded once per version.

    Kept in ``inputs/`` of the cache (:func:`cache_root`) under a digest of the object's
    identity (URL, size, ETag, time: one HEAD request), so an unchanged object is not
    downloaded again and a changed one gets a new copy. A shapefile brings the sidecar
    files beside it that exist, written before it (its presence means the copy is whole).
    Label files are read whole anyway (vectors) or small beside the imagery (rasters);
    sources are never copied, they are read window by window.
    """
    folder = cache_root() / "inputs" / remote.object_identity(url)[:24]
    name = remote.ObjectURL.parse(url).name
    target = folder / name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = os.path.splitext(url)
    if suffix.lower() == ".shp":
        for part in _SHAPEFILE_PARTS:
            if remote.exists(stem + part):
                remote.download(stem + part, folder / (os.path.splitext(name)[0] + part))
    return remote.download(url, target)  # written under a temporary name, then renamed


#: Written last into a mirror directory: which URL it mirrors (a mirror without it is
#: rebuilt from the objects).
MIRROR_MARKER = ".segflow-mirror.json"


def join(base: Location, *names: str) -> Location:
    """``base`` joined with ``names``: a URL string for a URL, else a :class:`Path`."""
    if remote.is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def same(a: Location, b: Location) -> bool:
    """Whether ``a`` and ``b`` name the same file or object."""
    if remote.is_url(a) or remote.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def read_text(location: Location) -> str | None:
    """The text of the file or object at ``location``; None when there is none."""
    if remote.is_url(location):
        url = str(location)
        return remote.read_bytes(url).decode() if remote.exists(url) else None
    try:
        return Path(location).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_text(location: Location, text: str) -> Location:
    """Write ``text`` whole: atomically on disk, in one PUT on object storage."""
    if remote.is_url(location):
        remote.write_bytes(str(location), text.encode())
        return str(location)
    return write_text_atomic(location, text)


def exists(location: Location) -> bool:
    """A file or directory; an object, or any object below the prefix."""
    if remote.is_url(location):
        url = str(location).rstrip("/")
        return remote.exists(url) or bool(remote.list_keys(url, limit=1))
    return Path(location).exists()


def remove(location: Location) -> None:
    """Remove a file or directory; an object and everything below the prefix (missing: fine)."""
    if remote.is_url(location):
        url = str(location).rstrip("/")
        remote.delete(url)
        remote.remove_prefix(url)
    elif Path(location).is_dir() and not Path(location).is_symlink():
        shutil.rmtree(location)
    else:
        Path(location).unlink(missing_ok=True)


def identity(url: str) -> dict[str, Any]:
    """The content identity of an object, or of every object below a prefix (their sizes,
    ETags and times: HEAD and LIST requests, never a download); of a Zarr store, its
    metadata documents (segflow records in them how every array was made)."""
    url = url.rstrip("/")
    info = remote.stat(url)
    if info is not None:
        return {"url": url, "sha256": remote.object_identity(url)}
    keys = remote.list_keys(url)
    if not keys:
        raise remote.RemoteError(f"input not found: {remote.redact(url)!r}: check the URL")
    prefix = remote.ObjectURL.parse(url).key + "/"
    names = sorted(k[len(prefix) :] for k in keys)
    zarr = "zarr.json" in names
    if zarr:
        names = [n for n in names if n.rsplit("/", 1)[-1] == "zarr.json"]
    objects = {n: remote.object_identity(f"{url}/{n}") for n in names}
    return {"url": url, "kind": "zarr" if zarr else "prefix", "objects": objects}


#: In a mirror: the size and time of each file when it was last uploaded (or downloaded).
UPLOADED = ".segflow-uploaded.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _mirror_dir(url: str, cache: Path) -> Path:
    return cache / "mirrors" / hashlib.sha256(url.encode()).hexdigest()[:24]


@contextlib.contextmanager
def local_mirror(url: str, *, cache: Path) -> Iterator[Path]:
    """A local directory standing for the prefix ``url``; uploaded there when the body ends.

    The directory (in ``cache``/mirrors, named by the URL's digest) is kept between runs: a
    run killed part-way finds its own files again on this machine. Without it (another
    machine, a cleared cache) it is first filled from the objects below ``url``. Files are
    uploaded whole, every ``checkpoint.json`` after the files beside it, so a checkpoint on
    object storage is complete once its ``checkpoint.json`` is there. On an exception, what
    was written is uploaded too (a resumable training state), and the exception goes on.
    """
    url = url.rstrip("/")
    local = _mirror_dir(url, cache)
    marker = local / MIRROR_MARKER
    if not marker.is_file():
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        prefix = remote.ObjectURL.parse(url).key + "/"
        fetched: dict[str, str] = {}
        for key in remote.list_keys(url):
            rel = key[len(prefix) :]
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            remote.download(f"{url}/{rel}", target)
            fetched[rel] = _stamp(target)
        write_text_atomic(local / UPLOADED, json.dumps(fetched))  # there already
        write_text_atomic(marker, json.dumps({"url": url}))
    try:
        yield local
    finally:
        sync_up(local, url)


def sync_up(local: Path, url: str) -> int:
    """Upload every file below ``local`` whose size or time changed since its last upload
    (``checkpoint.json`` files last); returns how many were uploaded."""
    state_file = local / UPLOADED
    try:
        uploaded = json.loads(state_file.read_text())
    except (OSError, ValueError):
        uploaded = {}
    files = sorted(
        (p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".segflow-")),
        key=lambda p: (p.name == "checkpoint.json", p.as_posix()),
    )
    count = 0
    for path in files:
        rel = path.relative_to(local).as_posix()
        stamp = _stamp(path)
        if uploaded.get(rel) == stamp:
            continue
        remote.upload(path, f"{url}/{rel}")
        uploaded[rel] = stamp
        count += 1
    gone = [rel for rel in uploaded if not (local / rel).is_file()]
    for rel in gone:  # removed locally (an old checkpoint): removed there too
        remote.delete(f"{url}/{rel}")
        del uploaded[rel]
    write_text_atomic(state_file, json.dumps(uploaded))
    log.debug("mirror %s: %d file(s) uploaded to %s", local, count, remote.redact(url))
    return count


def forget_mirror(url: str, *, cache: Path) -> None:
    """Drop the local mirror of ``url`` (a fresh run must not resume old files)."""
    shutil.rmtree(_mirror_dir(url.rstrip("/"), cache), ignore_errors=True)


def mirror_path(url: str, *, cache: Path) -> Path:
    """Where :func:`local_mirror` keeps the mirror of ``url``."""
    return _mirror_dir(url.rstrip("/"), cache)
