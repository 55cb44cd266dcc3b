"""A source's content hash (VRT members included), the identity stage keys and stores record."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from segflow.errors import SourceError
from segflow.io.remote import is_url, object_identity, object_url
from segflow.io.sources.base import _one_line
from segflow.io.sources.files import _local_path, _looks_like_vrt, _vrt_references
from segflow.io.sources.stac import is_stac_item, stac_members, vrt_xml

__all__ = ["source_sha256"]


# ------------------------------------------------------------------------------- hashing
def source_sha256(uri: str | Path, *, assets: Sequence[str] = ()) -> str:
    """The SHA-256 content hash of a source (hex).

    An object behind a URL is identified by its URL, size, ETag and last-modified time
    (:func:`~segflow.io.remote.object_identity`). A file hashes its bytes. A VRT hashes its
    XML followed by the hashes of the files it refers to, in document order (recursively), so
    editing a tile changes the mosaic's hash. A STAC Item (``.json``) with ``assets`` is
    identified by the selected assets and their grid, not by the Item's JSON (unrelated
    metadata may change).

    Examples
    --------
    >>> source_sha256("data/samples/landsat/RGB.byte.tif")[:8]  # doctest: +SKIP
    '...'
    """
    if is_stac_item(uri):
        return _stac_sha256(str(uri), assets)
    if is_url(uri):  # an object: its ETag, size and time (a HEAD request, not a download)
        return object_identity(object_url(str(uri)))
    return _sha256(_local_path(uri), ())


def _sha256(path: Path, stack: tuple[Path, ...]) -> str:
    if path in stack:
        raise SourceError(
            f"VRT {str(stack[-1])!r} refers to itself through {str(path)!r}: fix the VRT"
        )
    try:
        with open(path, "rb") as f:
            if not _looks_like_vrt(f.read(512)):
                f.seek(0)
                return hashlib.file_digest(f, "sha256").hexdigest()
            f.seek(0)
            xml = f.read()
    except OSError as err:
        raise SourceError(
            f"cannot read {str(path)!r} to hash it ({_one_line(err)}): "
            "check the file exists and is readable"
        ) from None
    h = hashlib.sha256(xml)
    for ref in _vrt_references(path, check=True):
        if isinstance(ref, Path):
            h.update(bytes.fromhex(_sha256(ref, (*stack, path))))
        else:  # a GDAL virtual path (/vsicurl/...): hash its name
            h.update(ref.encode())
    return h.hexdigest()


def _stac_sha256(location: str, assets: Sequence[str]) -> str:
    """The stacked image's grid (its VRT) and each selected asset's own identity."""
    members = stac_members(location, assets)
    h = hashlib.sha256(vrt_xml(members).encode())
    for m in members:
        h.update(source_sha256(m.href).encode())
    return h.hexdigest()
