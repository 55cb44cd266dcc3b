"""Files before they are opened: local paths, first bytes, truncated TIFFs and VRT members."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from segflow.errors import SourceError
from segflow.io.sources.base import TIFF_MAGICS, _one_line
from segflow.io.sources.tiff_source import _tiff_open

__all__ = ["check_tiff_complete"]


def _local_path(uri: str | Path) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        raise SourceError(f"only local files are supported, got {text!r}: download it first")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if not path.exists():
        raise SourceError(
            f"image file not found: {text!r} (resolved to {str(path)!r}): check the path"
        )
    if path.is_dir():
        raise SourceError(
            f"source is a directory, not an image file: {str(path)!r}: pass the image file itself"
        )
    return path


def _head(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as err:
        raise SourceError(
            f"cannot read {str(path)!r} ({_one_line(err)}): check the file's permissions"
        ) from None


def _looks_like_vrt(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:11].lower() == b"<vrtdataset"


def check_tiff_complete(path: str | Path) -> None:
    """Raise :class:`SourceError` unless every strip/tile of every TIFF page lies in the file.

    Catches truncated copies at open time instead of half-way through an ingest.
    """
    p = Path(path)
    size = p.stat().st_size
    tif = _tiff_open(p)
    try:
        seen: set[int] = set()
        pages: list[Any] = []
        try:
            pages.extend(tif.pages)
            for series in tif.series:
                for lvl in series.levels:
                    pages.extend(lvl.pages)
        except Exception as err:
            raise SourceError(
                f"truncated or corrupt TIFF {str(p)!r} ({_one_line(err)}): "
                "copy or download the file again"
            ) from None
        if not pages:
            raise SourceError(
                f"truncated or corrupt TIFF {str(p)!r}: no readable image directory in its "
                f"{size} bytes: copy or download the file again"
            )
        for i, page in enumerate(pages):
            if page is None or id(page) in seen:
                continue
            seen.add(id(page))
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size == 0:
                if int(np.prod(page.shape or (0,))) > 0:  # pixels, but nowhere to read them
                    raise SourceError(
                        f"truncated or corrupt TIFF {str(p)!r}: page {i} has no readable "
                        "strip or tile offsets: copy or download the file again"
                    )
                continue
            ends = np.where(counts > 0, offsets + counts, 0)
            end = int(ends.max())
            if end > size:
                raise SourceError(
                    f"truncated TIFF {str(p)!r}: page {i} needs {end} bytes but the file has "
                    f"{size}: copy or download the file again"
                )
    finally:
        tif.close()


def _vrt_references(path: Path, *, check: bool) -> list[Path | str]:
    """Files a VRT refers to (``Path``), or GDAL virtual paths (``str``), in document order."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise SourceError(
            f"cannot parse VRT {str(path)!r} ({_one_line(err)}): check it is complete XML"
        ) from None
    refs: list[Path | str] = []
    for el in root.iter("SourceFilename"):
        name = (el.text or "").strip()
        if not name:
            continue
        if name.startswith("/vsi") or "://" in name:
            refs.append(name)
            continue
        ref = Path(name)
        if not ref.is_absolute():
            base = path.parent if el.get("relativeToVRT", "0") == "1" else Path.cwd()
            ref = base / ref
        ref = Path(os.path.abspath(ref))
        if check:
            if not ref.is_file():
                raise SourceError(
                    f"VRT {str(path)!r} refers to a missing file {name!r} "
                    f"(resolved to {str(ref)!r}): restore it or fix the VRT"
                )
            if _head(ref, 4).startswith(TIFF_MAGICS):
                check_tiff_complete(ref)
        refs.append(ref)
    return refs
