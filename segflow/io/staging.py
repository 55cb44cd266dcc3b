"""Outputs on object storage: checked like local ones, written locally, uploaded when complete.

The exporters need local files (GDAL's COG driver writes its overviews after the full
resolution, GeoPackage is SQLite, OME-Zarr a directory), and an object store cannot rename.
So a run's URL outputs are planned first (:func:`plan_urls`: the bucket answers, nothing of
the user's is replaced, no output is an input), written to local stand-ins in a temporary
directory (:func:`staged_outputs`), and uploaded only after every one was written: each object
appears whole (a single PUT, or a multipart upload that S3 publishes on completion) or not
at all. A file's GDAL sidecar (``.aux.xml``) is uploaded before the file, and an OME-Zarr's
root ``zarr.json`` after every other object of the tree, so a reader that finds the output
finds it complete.

Examples
--------
>>> url_parent("s3://bucket/run/mask.tif")
's3://bucket/run'
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from segflow.errors import ConfigError
from segflow.io import remote
from segflow.outputs import SIDECAR_SUFFIXES, OutputRecord

__all__ = ["plan_urls", "publish", "staged_outputs", "url_parent", "url_stamp"]

#: The object whose presence makes an OME-Zarr tree visible: uploaded last.
_TREE_ROOT = "zarr.json"


def url_parent(url: str) -> str:
    """The prefix that holds ``url``."""
    return url.rsplit("/", 1)[0]


def url_stamp(url: str, *, tree: bool = False) -> str | None:
    """Size and ETag of the object at ``url`` (of a tree's root object), or ``None``: what
    :class:`~segflow.outputs.OutputRecord` compares for outputs on object storage (one
    HEAD request)."""
    info = remote.stat(f"{url}/{_TREE_ROOT}" if tree else url)
    return None if info is None else f"{info.size}:{info.etag}"


def _files(url: str) -> set[str]:
    """An output's objects: it and its sidecars."""
    return {url, *(url + suffix for suffix in SIDECAR_SUFFIXES)}


def _overlaps(url: str, other: str) -> bool:
    return url == other or url.startswith(other + "/") or other.startswith(url + "/")


def plan_urls(
    outputs: Mapping[str, str | None],
    *,
    inputs: Iterable[str | Path],
    overwrite: bool = False,
    record: OutputRecord | None = None,
    trees: Iterable[str] = (),
) -> dict[str, str]:
    """Check the URL outputs of a run, like :func:`~segflow.outputs.plan_outputs` does local
    ones; returns ``{name: url}``. Entries that are not URLs are skipped.

    Each URL is writable (``s3://``, ``gs://``), names neither an input nor a prefix around
    one, nor another output or its sidecar; its bucket answers (one LIST); an object already
    there is replaced only when ``record`` holds it unchanged (this command's earlier run)
    or with ``overwrite``.

    Raises
    ------
    ConfigError
        A read-only or unsupported URL, an overlap, or an object the run may not replace.
    ~segflow.io.remote.RemoteError
        The bucket is missing, refuses the credentials, or the endpoint cannot be reached.
    """
    owned = record or OutputRecord({})
    tree_names = set(trees)
    ins = [str(p).rstrip("/") for p in inputs if remote.is_url(p)]
    plan: dict[str, str] = {}
    for name, raw in outputs.items():
        if not raw or not remote.is_url(raw):
            continue
        url = remote.check_location(raw, what=name, write=True)
        for other, taken in plan.items():
            if _files(url) & _files(taken) or _overlaps(url, taken):
                raise ConfigError(
                    f"{other} and {name} both write {taken!r} (or a sidecar of it): give each "
                    "output its own URL"
                )
        for src in ins:
            if _overlaps(url, src):
                raise ConfigError(
                    f"{name}: {raw!r} overlaps an input of this run ({src!r}); inputs are never "
                    "written: choose another URL"
                )
        remote.check_prefix(url_parent(url), what=name)  # the bucket answers: fail now
        tree = name in tree_names
        stamp = url_stamp(url, tree=tree)
        there = stamp is not None or (tree and remote.check_prefix(url, what=name))
        ours = stamp is not None and owned.stamps.get(url) == stamp
        if there and not overwrite and not ours:
            raise ConfigError(
                f"{name}: {raw!r} already exists and is not an output of this command's earlier "
                "run: pass --overwrite to replace it, or choose another URL"
            )
        plan[name] = url
    return plan


def publish(local: Path, url: str, *, tree: bool = False) -> None:
    """Upload the finished output ``local`` to ``url``: a file after its sidecars (an old
    sidecar without a new one is deleted), a directory tree with its root object last (the
    objects of an earlier tree are removed first)."""
    if tree:
        remote.remove_prefix(url)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        root = local / _TREE_ROOT
        for path in [p for p in files if p != root] + ([root] if root.is_file() else []):
            remote.upload(path, f"{url}/{path.relative_to(local).as_posix()}")
        return
    for suffix in SIDECAR_SUFFIXES:
        side, target = local.with_name(local.name + suffix), url + suffix
        if side.is_file():
            remote.upload(side, target)
        else:
            remote.delete(target)
    remote.upload(local, url)


@contextlib.contextmanager
def staged_outputs(
    urls: Mapping[str, str], *, trees: Iterable[str] = ()
) -> Iterator[dict[str, str]]:
    """Local stand-ins for the URL outputs ``{name: url}``: yields ``{name: local path}``
    in a fresh temporary directory; when the block ends without an error, :func:`publish`
    uploads each one (``trees``: names of directory outputs). Nothing is uploaded after an
    error, and the temporary directory is removed either way."""
    tmp = Path(tempfile.mkdtemp(prefix="segflow-outputs-"))
    try:
        local: dict[str, str] = {}
        for name, url in urls.items():
            folder = tmp / name
            folder.mkdir()
            local[name] = str(folder / remote.ObjectURL.parse(url).name)
        yield local
        tree_names = set(trees)
        for name, url in urls.items():
            publish(Path(local[name]), url, tree=name in tree_names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
