"""Which reader opens a file (by its content), the pixel budget checked from the header
before any pixel is read, and the checks that refuse truncated files.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segflow.errors import ConfigError, SourceError
from segflow.io.remote import (
    check_location,
    configure_gdal,
    head,
    is_url,
    object_url,
    read_range,
)
from segflow.io.sources.base import TIFF_MAGICS, Source
from segflow.io.sources.files import (
    _head,
    _local_path,
    _looks_like_vrt,
    _vrt_references,
    check_tiff_complete,
)
from segflow.io.sources.openslide_source import OpenSlideSource
from segflow.io.sources.plain_source import PlainImageSource
from segflow.io.sources.rasterio_source import RasterioSource, _rio_open
from segflow.io.sources.stac import StacSource, is_stac_item
from segflow.io.sources.tiff_source import TiffSlideSource, _tiff_open

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_MAX_PIXELS",
    "check_pixel_budget",
    "check_tiff_complete",
    "declared_size",
    "max_pixels",
    "open_source",
]

log = logging.getLogger(__name__)

#: Default largest full-resolution image (pixels) :func:`open_source` accepts: 2**36, about
#: 68.7 gigapixels (a 262144 x 262144 mosaic; a 100k x 100k slide is 10 gigapixels).
DEFAULT_MAX_PIXELS = 2**36
#: Environment variable that overrides :data:`DEFAULT_MAX_PIXELS`.
ENV_MAX_PIXELS = "SEGFLOW_MAX_PIXELS"


# ------------------------------------------------------------------------------ dispatch
def open_source(
    uri: str | Path,
    *,
    level: int = 0,
    max_pixels: int | None = None,
    assets: Sequence[str] = (),
) -> Source:
    """Open an image file for window reads, choosing the reader by content.

    Parameters
    ----------
    uri : a local path (or ``file://`` URI) to a GeoTIFF/COG/VRT, a whole-slide image, a TIFF,
        PNG or JPEG.
    level : pyramid level to read (0 = full resolution).
    max_pixels : the largest full-resolution image (width x height, as the file's header
        declares it) to accept; None: :func:`max_pixels` (``$SEGFLOW_MAX_PIXELS``, else
        :data:`DEFAULT_MAX_PIXELS`). Checked before any pixel is read.
    assets : with a STAC Item (``.json``) as ``uri``: the keys of the assets to read as the
        image's bands, in order (:class:`~segflow.io.sources.stac.StacSource`); empty: the
        Item's only raster asset.

    Raises
    ------
    SourceError
        Missing, truncated or unreadable file, a level the file does not have, or a file
        that declares more than ``max_pixels`` pixels.
    ConfigError
        ``max_pixels`` (or ``$SEGFLOW_MAX_PIXELS``) is not a positive integer.

    Examples
    --------
    >>> with open_source("data/samples/landsat/RGB.byte.tif") as src:  # doctest: +SKIP
    ...     src.info.bands, src.info.nodata
    (('red', 'green', 'blue'), 0.0)
    """
    if is_stac_item(uri):
        return _within_budget(StacSource(uri, level, assets), uri, _max_pixels_arg(max_pixels))
    if assets:
        raise SourceError(
            f"assets {list(assets)} need a STAC Item (.json) as the image, got {str(uri)!r}: "
            "drop --asset, or pass the Item"
        )
    if is_url(uri):
        return _open_remote(str(uri), level=level, limit=_max_pixels_arg(max_pixels))
    path = _local_path(uri)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise SourceError(f"level must be an integer >= 0, got {level!r}: pass e.g. level=0")
    limit = _max_pixels_arg(max_pixels)
    head = _head(path)
    size = declared_size(path, head)
    if size is not None:
        check_pixel_budget(path, *size, limit=limit)
    is_tiff = head.startswith(TIFF_MAGICS)
    if is_tiff:
        check_tiff_complete(path)
    source = _dispatch(path, head, is_tiff, level)
    if source is not None:
        # again from the reader's own view, for headers declared_size could not parse
        return _within_budget(source, path, limit)
    raise SourceError(
        f"cannot open {str(path)!r}: no image reader recognises it (it starts with "
        f"{head[:12]!r}): pass a GeoTIFF, COG, VRT, whole-slide image (SVS, NDPI, MRXS, "
        "OME-TIFF, ...), TIFF, PNG or JPEG"
    )


def _open_remote(url: str, *, level: int, limit: int) -> Source:
    """An image behind a URL, read window by window by ranged GETs (a window of a COG costs
    a few requests, never the whole object): a georeferenced raster (or anything but a TIFF)
    through GDAL's virtual file systems; a TIFF without a CRS (SVS, OME-TIFF and other
    slides, plain TIFFs) through tifffile over the object, as :func:`_open_tiff` chooses
    (OpenSlide reads only local files)."""
    check_location(url, what="image")
    configure_gdal()
    head(object_url(url))  # a missing bucket/key or bad credentials: one clear line
    if read_range(object_url(url), 0, 4).startswith(TIFF_MAGICS) and not _gdal_has_crs(url):
        return _within_budget(_open_tiff(url, level), url, limit)
    return _within_budget(RasterioSource(url, level), url, limit)


def _within_budget(source: Source, where: str | Path, limit: int) -> Source:
    """``source``, once its largest level (as its reader sees it) fits the pixel budget."""
    h, w = max(source.info.level_shapes, key=lambda s: s[0] * s[1])
    try:
        check_pixel_budget(where, w, h, limit=limit)
    except SourceError:
        source.close()
        raise
    return source


def _dispatch(path: Path, head: bytes, is_tiff: bool, level: int) -> Source | None:
    """The reader for ``path`` (see the module notes), or None when none recognises it."""
    if _looks_like_vrt(head):
        _vrt_references(path, check=True)
        return RasterioSource(path, level)
    if _gdal_has_crs(path):
        return RasterioSource(path, level)
    if is_tiff:
        return _open_tiff(path, level)
    if _openslide_vendor(path) is not None:
        return OpenSlideSource(path, level)
    if _pillow_opens(path):
        return PlainImageSource(path, level)
    if _gdal_opens(path):
        return RasterioSource(path, level)
    return None


def _open_tiff(path: Path | str, level: int) -> Source:
    """The reader of a TIFF (a local file, or a URL: then tifffile, or GDAL for a plain
    image, since OpenSlide and Pillow read local files only)."""
    tif = _tiff_open(path)
    try:
        series = tif.series[0] if tif.series else None
        if series is None:
            raise SourceError(f"TIFF {str(path)!r} holds no image: pass a TIFF with pixels")
        levels = series.levels
        page = levels[0].pages[0] if levels[0].pages else series.pages[0]
        rgb8 = (
            np.dtype(series.dtype) == np.uint8
            and int(page.photometric) in (2, 6)
            and int(page.samplesperpixel) in (3, 4)
        )
        wsi_flavour = any(
            getattr(tif, f"is_{f}", False) for f in ("svs", "ndpi", "scn", "bif", "philips", "qpi")
        )
        slide_like = len(levels) > 1 or tif.is_ome or wsi_flavour or (bool(page.is_tiled) and rgb8)
        tiff_shapes = [tuple(lv.shape) for lv in levels]
        tiff_levels = len(levels)
    finally:
        tif.close()
    local = isinstance(path, Path)
    vendor = _openslide_vendor(path) if rgb8 and local else None
    if vendor is not None:
        import openslide

        try:
            with openslide.OpenSlide(str(path)) as osr:
                n_os = osr.level_count
                ds = float(osr.level_downsamples[level]) if level < n_os else 1.0
                os_dims = list(osr.level_dimensions)
        except Exception:
            n_os, ds, os_dims = 0, 1.0, []
        if n_os >= tiff_levels and n_os > 0:
            if level < n_os and ds != int(ds):
                # OpenSlide would resample by a sub-pixel shift: read exact pixels via tifffile
                w, h = os_dims[level]
                same = level < tiff_levels and tuple(tiff_shapes[level][:2]) == (h, w)
                if same:
                    log.debug(
                        "%s level %d: downsample %.4f is not an integer; reading with tifffile",
                        path,
                        level,
                        ds,
                    )
                    return TiffSlideSource(path, level)
                log.warning(
                    "%s level %d: downsample %.4f is not an integer, so OpenSlide "
                    "positions windows to within a sub-pixel",
                    path,
                    level,
                    ds,
                )
            return OpenSlideSource(path, level)
        log.debug(
            "%s: OpenSlide sees %d level(s), tifffile %d: using tifffile", path, n_os, tiff_levels
        )
        return TiffSlideSource(path, level)
    if slide_like:
        return TiffSlideSource(path, level)
    return PlainImageSource(path, level) if local else RasterioSource(path, level)


# --------------------------------------------------------------------------- pixel budget
def max_pixels() -> int:
    """The pixel budget per source: ``$SEGFLOW_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`.

    The variable holds a positive integer (``68719476736``, ``1e12``, ``2**40`` and
    ``1_000_000`` forms are accepted).

    Raises
    ------
    ConfigError
        The variable is set but is not a positive integer.

    Examples
    --------
    >>> max_pixels() == int(os.environ.get(ENV_MAX_PIXELS) or DEFAULT_MAX_PIXELS)  # doctest: +SKIP
    True
    """
    text = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    value: float | None
    try:
        if "**" in text:
            base, _, exp = text.partition("**")
            value = float(int(base.strip()) ** int(exp.strip()))
        else:
            value = float(text.replace("_", ""))
    except (ValueError, OverflowError):
        value = None
    if value is None or not math.isfinite(value) or value < 1 or value != int(value):
        raise ConfigError(
            f"{ENV_MAX_PIXELS} must be a positive integer number of pixels, got {text!r}: "
            f"unset it (default {DEFAULT_MAX_PIXELS}) or set e.g. {ENV_MAX_PIXELS}=1000000000000"
        )
    return int(value)


def _max_pixels_arg(limit: int | None) -> int:
    """``limit`` checked (a positive integer), or :func:`max_pixels` when None."""
    if limit is None:
        return max_pixels()
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise ConfigError(
            f"max_pixels must be a positive integer, got {limit!r}: pass e.g. "
            f"max_pixels={DEFAULT_MAX_PIXELS} or None for ${ENV_MAX_PIXELS}"
        )
    return int(limit)


def check_pixel_budget(path: str | Path, width: int, height: int, *, limit: int) -> None:
    """Refuse (one :class:`SourceError` line) an image of more than ``limit`` pixels.

    Examples
    --------
    >>> check_pixel_budget("a.tif", 1000, 1000, limit=10**6)
    >>> check_pixel_budget("bomb.tif", 10**6, 10**6, limit=2**36)
    Traceback (most recent call last):
    ...
    segflow.errors.SourceError: 'bomb.tif' declares 1000000 x 1000000 = 1000000000000 pixels, over the limit of 68719476736 pixels per source: if the image is genuine, set SEGFLOW_MAX_PIXELS=1000000000000 (or more) and run again
    """
    n = int(width) * int(height)
    if n > limit:
        raise SourceError(
            f"{str(path)!r} declares {int(width)} x {int(height)} = {n} pixels, over the limit "
            f"of {limit} pixels per source: if the image is genuine, set "
            f"{ENV_MAX_PIXELS}={n} (or more) and run again"
        )


def declared_size(path: str | Path, head: bytes | None = None) -> tuple[int, int] | None:
    """``(width, height)`` of the full-resolution image as the file's header declares it.

    Reads headers only, never pixels, and allocates nothing in proportion to the size:

    - TIFF (GeoTIFF, COG, BigTIFF, SVS, NDPI, OME-TIFF, ...): ``ImageWidth`` and
      ``ImageLength`` of the first image directory, parsed by hand (the full-resolution
      image in every pyramid layout).
    - VRT: the ``rasterXSize`` and ``rasterYSize`` attributes of ``VRTDataset``.
    - PNG: the ``IHDR`` chunk.
    - anything else: OpenSlide's level-0 dimensions when it detects the format, else GDAL's
      (both only parse headers on open).

    Returns None when the header cannot be parsed (the readers then report the file).

    Examples
    --------
    >>> declared_size("data/samples/landsat/RGB.byte.tif")  # doctest: +SKIP
    (791, 718)
    """
    p = Path(path)
    if head is None:
        head = _head(p)
    try:
        if head.startswith(TIFF_MAGICS):
            return _tiff_declared_size(p)
        if _looks_like_vrt(head):
            return _vrt_declared_size(p)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
            w, h = struct.unpack(">II", head[16:24])
            return int(w), int(h)
    except (OSError, ValueError, struct.error, ET.ParseError):
        return None
    if _openslide_vendor(p) is not None:
        try:
            import openslide

            with openslide.OpenSlide(str(p)) as osr:
                w, h = osr.level_dimensions[0]
            return int(w), int(h)
        except Exception:
            return None
    try:
        with _rio_open(p) as ds:
            return int(ds.width), int(ds.height)
    except Exception:
        return None


#: TIFF field types holding an unsigned integer: type code -> (struct format, size)
_TIFF_UINT = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}


def _tiff_declared_size(path: Path) -> tuple[int, int] | None:
    """``(ImageWidth, ImageLength)`` of a TIFF's first image directory (classic or BigTIFF)."""
    with open(path, "rb") as f:
        head = f.read(16)
        bo = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(bo + "H", head[2:4])[0]
        if version == 42:
            (offset,) = struct.unpack(bo + "I", head[4:8])
            count_fmt, entry_size, count_fmt_entry = "H", 12, "I"
        elif version == 43:
            (offset,) = struct.unpack(bo + "Q", head[8:16])
            count_fmt, entry_size, count_fmt_entry = "Q", 20, "Q"
        else:
            return None
        f.seek(offset)
        raw = f.read(struct.calcsize(count_fmt))
        (n,) = struct.unpack(bo + count_fmt, raw)
        n = min(int(n), 4096)  # a real directory has a few dozen entries
        table = f.read(n * entry_size)
    value_size = entry_size - 4 - struct.calcsize(count_fmt_entry)
    found: dict[int, int] = {}
    for i in range(len(table) // entry_size):
        entry = table[i * entry_size : (i + 1) * entry_size]
        tag, typ = struct.unpack(bo + "HH", entry[:4])
        if tag not in (256, 257) or typ not in _TIFF_UINT:
            continue
        fmt, size = _TIFF_UINT[typ]
        if size > value_size:
            continue
        value = entry[4 + struct.calcsize(count_fmt_entry) :][:size]
        found[tag] = int(struct.unpack(bo + fmt, value)[0])
        if len(found) == 2:
            return found[256], found[257]
    return None


def _vrt_declared_size(path: Path) -> tuple[int, int] | None:
    """``(rasterXSize, rasterYSize)`` of a VRT (its root element only is parsed)."""
    for _, el in ET.iterparse(path, events=("start",)):
        w, h = el.get("rasterXSize"), el.get("rasterYSize")
        return (int(w), int(h)) if w is not None and h is not None else None
    return None


def _gdal_has_crs(path: Path | str) -> bool:
    try:
        with _rio_open(path) as ds:
            return ds.crs is not None and ds.count > 0
    except Exception:
        return False


def _gdal_opens(path: Path) -> bool:
    try:
        with _rio_open(path) as ds:
            return bool(ds.count > 0)
    except Exception:
        return False


def _openslide_vendor(path: Path | str) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def _pillow_opens(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return bool(img.size[0] > 0 and img.size[1] > 0)
    except (UnidentifiedImageError, OSError, ValueError):
        return False
    except Image.DecompressionBombError:
        return True  # reported properly by PlainImageSource
