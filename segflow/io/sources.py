"""Image sources: read a large image window by window, exactly as stored.

:func:`open_source` inspects a file's *content* and returns one of four readers, all with the
same interface (:class:`Source`): ``read(window)`` gives the pixels as ``(band, row, col)``,
``read_valid(window)`` the ``(row, col)`` mask of the data footprint, and ``info`` describes
the image (:class:`SourceInfo`).

Readers (``info.kind`` in brackets):

- :class:`RasterioSource` (``geotiff``): anything GDAL opens with a CRS (GeoTIFF, COG, ...)
  and every VRT. Valid = GDAL's dataset mask (nodata, internal mask or alpha band).
- :class:`OpenSlideSource` (``slide``): whole-slide images OpenSlide detects (Aperio,
  Hamamatsu, MIRAX, generic tiled TIFF, ...), as RGB. Valid = tissue (see below).
- :class:`TiffSlideSource` (``slide``): tiled/pyramidal TIFF and OME-TIFF that OpenSlide
  cannot open or of which it sees only level 0 (SubIFD pyramids), read with tifffile through
  Zarr. Valid = tissue for 8-bit RGB; otherwise everything (alpha aside).
- :class:`PlainImageSource` (``image``): PNG/JPEG (decoded once, on the first read, and
  cached: these are small images) and TIFFs with no georeference that are not slides (read
  by window with tifffile). Valid = alpha > 0 if there is an alpha band, else everything.

Dispatch (first match wins): a VRT, or a file GDAL opens with a CRS -> rasterio (so a tiled
GeoTIFF is never taken for a slide); a TIFF -> OpenSlide when it detects an 8-bit RGB slide
and sees all of tifffile's pyramid levels, else tifffile (slide when pyramidal, OME, a known
WSI flavour or tiled 8-bit RGB; otherwise a plain image); another file OpenSlide detects ->
OpenSlide; a file Pillow opens -> plain image; another file GDAL opens -> rasterio (kind
``image``).

**Tissue rule (slides).** At open time ONE threshold is computed per slide: Otsu's threshold
of the HSV saturation, ``S = 255 * (max(R,G,B) - min(R,G,B)) // max(R,G,B)`` (integer, 0 for
black), over a thumbnail of the slide's smallest pyramid level (subsampled to about 1024
pixels a side; an 8 x 8 sample of windows when no level is under 4096 x 4096 pixels;
transparent pixels left out), clipped to ``[TISSUE_MIN_SATURATION, TISSUE_MAX_SATURATION]``.
The threshold is the same whatever level the slide is opened at. A pixel is tissue when
``S > threshold`` and it is not fully transparent (alpha > 0). The rule is per pixel with a
fixed threshold, so the mask does not depend on the window grid. Slides that are not 8-bit
RGB (e.g. fluorescence OME-TIFF) have no threshold: everything is valid (alpha aside).

Levels are pyramid levels (0 = full resolution). A source opened at ``level=k`` reads that
level's pixel grid, and its ``info`` (size, block, georeference, microns per pixel)
describes that grid. Reads are exact source pixels at every level: OpenSlide resamples by a
sub-pixel shift at levels with a non-integer downsample, so such levels of TIFF-based slides
are read with tifffile instead.

**Non-finite pixels.** In every reader, a pixel of a float (or complex) source where any band
is NaN or +/-inf is invalid, whatever the mask above says (:func:`valid_and_finite`, applied
once, in :meth:`Source.read_with_valid` and :meth:`Source.read_valid`).

**Pixel budget.** Right after reading the first bytes, and before any pixel is read or any
array created, :func:`open_source` takes the full-resolution size the file *declares* (the
first TIFF image directory, parsed by hand; a VRT's ``rasterXSize``/``rasterYSize``; a PNG's
``IHDR``; other formats from OpenSlide's or GDAL's header) and refuses a file of more than
``max_pixels`` pixels (:func:`max_pixels`: ``$SEGFLOW_MAX_PIXELS``, else
:data:`DEFAULT_MAX_PIXELS` = 2**36, about 68.7 gigapixels). A few-kilobyte TIFF that claims
10^6 x 10^6 pixels therefore fails in milliseconds instead of growing memory.

Bad input fails at open time with one :class:`SourceError` line: a missing file, a file no
reader recognises, a truncated TIFF (every strip/tile must lie inside the file; VRT members
are checked too), a truncated PNG (chunk CRCs), a missing VRT member, a level the file does
not have, a file over the pixel budget. A window outside the image raises
:class:`RegionError`.

Sources can be pickled (Dask workers): pickling drops open file handles, and the copy
reopens the file on first use. Each thread gets its own handle where the library is not
thread-safe (GDAL, tifffile); OpenSlide handles are shared.

Examples
--------
>>> from segflow.geometry import Window
>>> src = open_source("data/samples/spacenet_atlanta/sample_geotiff.tif")  # doctest: +SKIP
>>> src.info.kind, src.info.bands, src.info.georef.epsg  # doctest: +SKIP
('geotiff', ('gray',), 32616)
>>> src.read(Window(0, 0, 2, 3)).shape  # doctest: +SKIP
(1, 2, 3)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from segflow.errors import ConfigError, RegionError, SourceError
from segflow.geometry import Window
from segflow.io.store import GeoRef, SlideInfo
from segflow.stats import valid_and_finite

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_MAX_PIXELS",
    "TISSUE_MAX_SATURATION",
    "TISSUE_MIN_SATURATION",
    "OpenSlideSource",
    "PlainImageSource",
    "RasterioSource",
    "Source",
    "SourceInfo",
    "SourceKind",
    "TiffSlideSource",
    "check_pixel_budget",
    "check_tiff_complete",
    "declared_size",
    "max_pixels",
    "open_source",
    "saturation",
    "source_sha256",
    "tissue_mask",
    "valid_and_finite",
]

log = logging.getLogger(__name__)

SourceKind = Literal["geotiff", "slide", "image"]

#: Lower and upper clip of the per-slide saturation threshold (0..255 scale). The floor keeps
#: white/grey glass and noise out when Otsu splits a nearly empty slide; the ceiling keeps
#: pale (eosin) tissue in, which Otsu alone puts near 60 on H&E (CMU-1: 60; 33.7 % of the
#: thumbnail is above 20, 31.3 % above 40, 28.2 % above 60).
TISSUE_MIN_SATURATION = 15
TISSUE_MAX_SATURATION = 40

#: Default largest full-resolution image (pixels) :func:`open_source` accepts: 2**36, about
#: 68.7 gigapixels (a 262144 x 262144 mosaic; a 100k x 100k slide is 10 gigapixels).
DEFAULT_MAX_PIXELS = 2**36
#: Environment variable that overrides :data:`DEFAULT_MAX_PIXELS`.
ENV_MAX_PIXELS = "SEGFLOW_MAX_PIXELS"

_THUMB_SIDE = 1024
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ---------------------------------------------------------------------------- value objects
@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source holds, at the level it was opened at.

    Attributes
    ----------
    uri : absolute path of the file.
    kind : ``"geotiff"`` (GDAL-opened, georeferenced or VRT), ``"slide"`` (whole-slide image)
        or ``"image"`` (a plain pixel grid).
    height, width : pixels at the chosen level.
    bands : one name per band (GDAL description or colour interpretation; ``"red"``,
        ``"green"``, ``"blue"`` for RGB; ``"gray"`` for one band; ``"bandN"`` otherwise).
    dtype : numpy dtype name of :meth:`Source.read` results.
    nodata : the nodata value, or None.
    block : the native block/tile ``(rows, cols)``; reads aligned to it decode least.
    georef : CRS (WKT2 + EPSG) and GDAL geotransform of the chosen level's grid, or None.
    slide : whole-slide metadata, or None. ``mpp_x``/``mpp_y`` are microns per pixel *of the
        chosen level* (level-0 value times that level's downsample); ``downsample`` is the
        level's average downsample, as OpenSlide reports it.
    level_shapes : ``(height, width)`` of every level (one entry for a flat image).
    """

    uri: str
    kind: SourceKind
    height: int
    width: int
    bands: tuple[str, ...]
    dtype: str
    nodata: float | None
    block: tuple[int, int]
    georef: GeoRef | None
    slide: SlideInfo | None
    level_shapes: tuple[tuple[int, int], ...]

    @property
    def full_window(self) -> Window:
        """The window covering the whole image."""
        return Window(0, 0, self.height, self.width)


# ------------------------------------------------------------------------------ base class
class Source:
    """A window reader over one image at one level (use :func:`open_source` to make one).

    Subclasses implement ``_open_handle``, ``_close_handle``, ``_read`` and ``_read_valid``
    and set ``self.info`` in their constructor.
    """

    info: SourceInfo
    #: whether one handle may be shared by all threads (else one handle per thread)
    _shared_handle: ClassVar[bool] = False
    _TRANSIENT: ClassVar[tuple[str, ...]] = ("_handles", "_lock", "_local")

    def __init__(self, path: str | Path, level: int = 0) -> None:
        self.path = Path(os.path.abspath(path))
        if not isinstance(level, int) or isinstance(level, bool) or level < 0:
            raise SourceError(f"level must be an integer >= 0, got {level!r}: pass e.g. level=0")
        self.level = level
        self._init_transient()

    # -------------------------------------------------------------- handles and pickling
    def _init_transient(self) -> None:
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in self._TRANSIENT:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()

    def _handle(self) -> Any:
        key = 0 if self._shared_handle else threading.get_ident()
        handle = self._handles.get(key)
        if handle is None:
            with self._lock:
                handle = self._handles.get(key)
                if handle is None:
                    handle = self._open_handle()
                    self._handles[key] = handle
        return handle

    def _open_handle(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def close(self) -> None:
        """Close every open handle (a later read reopens the file)."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            try:
                self._close_handle(h)
            except Exception:  # closing must never raise
                log.debug("closing a handle of %s failed", self.path, exc_info=True)
        self._local = threading.local()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = getattr(self, "info", None)
        if i is None:
            return f"{type(self).__name__}({str(self.path)!r})"
        return (
            f"{type(self).__name__}({i.uri!r}, level={self.level}, {i.height}x{i.width}, "
            f"bands={i.bands}, dtype={i.dtype})"
        )

    # ------------------------------------------------------------------------- reading
    def read(self, window: Window) -> np.ndarray:
        """The pixels of ``window`` as ``(band, rows, cols)``, dtype ``info.dtype``.

        The window must lie inside the image (:class:`RegionError` otherwise).
        """
        self._check_window(window)
        return self._read(window)

    def read_valid(self, window: Window) -> np.ndarray:
        """The ``(rows, cols)`` boolean mask of pixels inside the data footprint.

        For float sources the pixels are read too: a pixel where any band is NaN or +/-inf
        is invalid (see :func:`valid_and_finite`).
        """
        if self._may_be_non_finite:
            return self.read_with_valid(window)[1]
        self._check_window(window)
        return self._read_valid(window)

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(read(window), read_valid(window))``, decoding the pixels only once where possible.

        This is the one place where the reader's own mask (nodata, internal mask, alpha,
        tissue) meets the non-finite rule: every valid mask a source hands out comes from here
        (or, for integer sources, which have no non-finite values, from ``_read_valid``).
        """
        self._check_window(window)
        data = self._read(window)
        return data, valid_and_finite(data, self._valid_of(window, data))

    @property
    def _may_be_non_finite(self) -> bool:
        """Whether pixels of this source can be NaN or infinite (float and complex dtypes)."""
        return np.dtype(self.info.dtype).kind in "fc"

    def _valid_of(self, window: Window, data: np.ndarray) -> np.ndarray:
        """The valid mask of ``window`` given its already-read pixels (default: read it)."""
        return self._read_valid(window)

    def _read(self, window: Window) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_valid(self, window: Window) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_window(self, window: Window) -> None:
        h, w = self.info.height, self.info.width
        if (
            window.size == 0
            or window.row_off < 0
            or window.col_off < 0
            or window.row_stop > h
            or window.col_stop > w
        ):
            raise RegionError(
                f"window {window} is empty or outside the image of {self.info.uri!r} "
                f"({h} x {w} pixels at level {self.level}): request a non-empty window within "
                f"rows 0..{h} and cols 0..{w}"
            )

    def _level_error(self, count: int) -> SourceError:
        return SourceError(
            f"level {self.level} is out of range for {str(self.path)!r}, which has {count} "
            f"level(s): pass a level from 0 to {count - 1}"
        )


# ---------------------------------------------------------------------------- rasterio
class RasterioSource(Source):
    """GeoTIFF, COG, VRT mosaics and other GDAL rasters, through rasterio.

    Level ``k > 0`` is GDAL overview ``k - 1``. ``read_valid`` is GDAL's dataset mask, which
    honours nodata, internal masks and alpha bands.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        try:
            with _rio_open(self.path) as ds:
                shapes = [(int(ds.height), int(ds.width))]
                for i in range(len(ds.overviews(1)) if ds.count else 0):
                    with _rio_open(self.path, overview_level=i) as ov:
                        shapes.append((int(ov.height), int(ov.width)))
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"GDAL cannot read {str(self.path)!r} ({_one_line(err)}): "
                "check the file is a complete raster GDAL can open"
            ) from None
        if level >= len(shapes):
            raise self._level_error(len(shapes))
        ds = self._handle()
        if ds.count == 0:
            raise SourceError(f"{str(self.path)!r} has no raster bands: pass a raster image")
        dtypes = set(ds.dtypes)
        dtype = ds.dtypes[0] if len(dtypes) == 1 else str(np.result_type(*sorted(dtypes)))
        crs = ds.crs
        georef = None
        if crs is not None:
            from rasterio.enums import WktVersion

            georef = GeoRef(
                crs_wkt=crs.to_wkt(version=WktVersion.WKT2_2019),
                epsg=crs.to_epsg(),
                geotransform=tuple(float(v) for v in ds.transform.to_gdal()),  # type: ignore[arg-type]
            )
        is_vrt = ds.driver == "VRT"
        self.info = SourceInfo(
            uri=str(self.path),
            kind="geotiff" if (georef is not None or is_vrt) else "image",
            height=int(ds.height),
            width=int(ds.width),
            bands=_unique(
                d or (ci.name if ci.name != "undefined" else f"band{i}")
                for i, (d, ci) in enumerate(zip(ds.descriptions, ds.colorinterp, strict=True), 1)
            ),
            dtype=str(np.dtype(dtype)),
            nodata=None if ds.nodata is None else float(ds.nodata),
            block=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
            georef=georef,
            slide=None,
            level_shapes=tuple(shapes),
        )

    def _open_handle(self) -> Any:
        kw = {"overview_level": self.level - 1} if self.level else {}
        return _rio_open(self.path, **kw)

    @staticmethod
    def _rio_window(window: Window) -> Any:
        from rasterio.windows import Window as RWindow

        return RWindow(window.col_off, window.row_off, window.width, window.height)

    def _read(self, window: Window) -> np.ndarray:
        try:
            out = self._handle().read(window=self._rio_window(window), out_dtype=self.info.dtype)
        except Exception as err:
            raise SourceError(
                f"reading {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file (and, for a VRT, the files it refers to) is complete"
            ) from None
        return np.asarray(out)

    def _valid_of(self, window: Window, data: np.ndarray) -> np.ndarray:
        # When every band's mask comes from nodata alone (or there is none), GDAL's dataset
        # mask is "any band != nodata": compute it from the pixels instead of decoding the
        # window a second time. Internal masks and alpha bands still go through GDAL.
        from rasterio.enums import MaskFlags

        flags = {tuple(f) for f in self._handle().mask_flag_enums}
        nodata = self.info.nodata
        if flags == {(MaskFlags.all_valid,)}:
            return np.ones(data.shape[1:], dtype=bool)
        if flags == {(MaskFlags.nodata,)} and nodata is not None:
            if np.isnan(nodata):
                return np.asarray(~np.isnan(data).all(axis=0))
            if np.can_cast(np.min_scalar_type(nodata), data.dtype) or data.dtype.kind == "f":
                return np.asarray((data != data.dtype.type(nodata)).any(axis=0))
        return self._read_valid(window)

    def _read_valid(self, window: Window) -> np.ndarray:
        try:
            mask = self._handle().dataset_mask(window=self._rio_window(window))
        except Exception as err:
            raise SourceError(
                f"reading the mask of {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        return np.asarray(mask) != 0


def _rio_open(path: Path, **kw: Any) -> Any:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, **kw)


# -------------------------------------------------------------------- non-finite pixels
# ------------------------------------------------------------------------ tissue rule
def saturation(rgb: np.ndarray) -> np.ndarray:
    """Integer HSV saturation (0..255) of a ``(3, rows, cols)`` uint8 array."""
    c = rgb[:3].astype(np.int32)
    mx = c.max(axis=0)
    mn = c.min(axis=0)
    return np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0)


def tissue_mask(rgb: np.ndarray, threshold: int, alpha: np.ndarray | None = None) -> np.ndarray:
    """The tissue rule: ``saturation > threshold`` and ``alpha > 0`` (see the module notes).

    Parameters
    ----------
    rgb : ``(3, rows, cols)`` uint8.
    threshold : the slide's saturation threshold (0..255).
    alpha : ``(rows, cols)`` alpha, or None when the image has none.

    Examples
    --------
    >>> rgb = np.array([[[250, 200]], [[250, 100]], [[250, 200]]], dtype=np.uint8)
    >>> tissue_mask(rgb, 20).tolist()
    [[False, True]]
    """
    mask = saturation(rgb) > threshold
    if alpha is not None:
        mask &= alpha > 0
    return mask


def _otsu(values: np.ndarray) -> int:
    """Otsu's threshold of integer values in 0..255 (class 0 is ``<= t``)."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * total) ** 2 / (w0 * w1)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    return int(np.argmax(between))


def _slide_threshold(thumb_rgb: np.ndarray, thumb_alpha: np.ndarray | None) -> int:
    sat = saturation(thumb_rgb)
    if thumb_alpha is not None:
        sat = sat[thumb_alpha > 0]
    t = _otsu(np.asarray(sat))
    return int(min(max(t, TISSUE_MIN_SATURATION), TISSUE_MAX_SATURATION))


# ---------------------------------------------------------------------------- OpenSlide
class OpenSlideSource(Source):
    """Whole-slide images through OpenSlide; pixels as RGB uint8.

    ``read_region`` positions a region in level-0 coordinates: a level-``k`` window starts at
    ``(col * downsample, row * downsample)``. That is exact only for integer downsamples, so
    :func:`open_source` reads TIFF-based slides whose level has a non-integer downsample
    through :class:`TiffSlideSource` instead.
    """

    _shared_handle = True  # OpenSlide is thread-safe

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        try:
            osr = self._handle()
        except Exception as err:
            raise SourceError(
                f"OpenSlide cannot open {str(self.path)!r} ({_one_line(err)}): "
                "check the slide file (and its companion files) is complete"
            ) from None
        if level >= osr.level_count:
            raise self._level_error(osr.level_count)
        props = osr.properties
        w, h = osr.level_dimensions[level]
        w0, h0 = osr.level_dimensions[0]
        ds = float(osr.level_downsamples[level])
        self._downsample = ds
        mpp_x = _float_or_none(props.get("openslide.mpp-x"))
        mpp_y = _float_or_none(props.get("openslide.mpp-y"))
        tile_h = props.get(f"openslide.level[{level}].tile-height")
        tile_w = props.get(f"openslide.level[{level}].tile-width")
        last = osr.level_count - 1
        lw, lh = osr.level_dimensions[last]
        lds = float(osr.level_downsamples[last])

        def read_last(win: Window) -> np.ndarray:
            loc = (round(win.col_off * lds), round(win.row_off * lds))
            region = osr.read_region(loc, last, (win.width, win.height))
            return np.asarray(region).transpose(2, 0, 1)

        thumb = _thumbnail(read_last, int(lh), int(lw))
        self.threshold = _slide_threshold(thumb[:3], thumb[3])
        self.info = SourceInfo(
            uri=str(self.path),
            kind="slide",
            height=int(h),
            width=int(w),
            bands=("red", "green", "blue"),
            dtype="uint8",
            nodata=None,
            block=(int(tile_h), int(tile_w)) if tile_h and tile_w else (256, 256),
            georef=None,
            slide=SlideInfo(
                mpp_x=None if mpp_x is None else mpp_x * (w0 / w),
                mpp_y=None if mpp_y is None else mpp_y * (h0 / h),
                objective_power=_float_or_none(props.get("openslide.objective-power")),
                vendor=props.get("openslide.vendor"),
                level=level,
                downsample=ds,
            ),
            level_shapes=tuple((int(b), int(a)) for a, b in osr.level_dimensions),
        )

    def _open_handle(self) -> Any:
        import openslide

        return openslide.OpenSlide(str(self.path))

    def _rgba(self, window: Window) -> np.ndarray:
        cached = getattr(self._local, "last", None)
        if cached is not None and cached[0] == window:
            return cached[1]
        ds = self._downsample
        loc = (round(window.col_off * ds), round(window.row_off * ds))
        try:
            region = self._handle().read_region(loc, self.level, (window.width, window.height))
        except Exception as err:
            raise SourceError(
                f"OpenSlide failed reading {window} of {self.info.uri!r} ({_one_line(err)}): "
                "check the slide file is complete"
            ) from None
        rgba = np.asarray(region)  # (rows, cols, 4), un-premultiplied
        self._local.last = (window, rgba)
        return rgba

    def _read(self, window: Window) -> np.ndarray:
        return np.ascontiguousarray(self._rgba(window)[..., :3].transpose(2, 0, 1))

    def _read_valid(self, window: Window) -> np.ndarray:
        rgba = self._rgba(window)
        return tissue_mask(rgba[..., :3].transpose(2, 0, 1), self.threshold, rgba[..., 3])


# ------------------------------------------------------------------------------ tifffile
@dataclass
class _TiffHandle:
    tif: Any  # tifffile.TiffFile
    array: Any  # zarr.Array over one level: axes as in `axes`

    def close(self) -> None:
        self.tif.close()


@dataclass(frozen=True)
class _TiffLayout:
    """Where the band, row and column axes of a tifffile level array are."""

    axes: str
    band_axis: int | None

    @classmethod
    def of(cls, axes: str, shape: tuple[int, ...], path: Path) -> _TiffLayout:
        if "Y" not in axes or "X" not in axes:
            raise SourceError(
                f"TIFF {str(path)!r} has axes {axes!r} with no Y/X plane: pass a 2-D image"
            )
        others = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
        if len(others) > 1:
            raise SourceError(
                f"TIFF {str(path)!r} is a stack with axes {axes!r} and shape {shape}: segflow "
                "reads one 2-D image (with bands); extract a single plane first"
            )
        band = others[0] if others else None
        return cls(axes, band)

    def take(self, arr: Any, window: Window) -> np.ndarray:
        index: list[Any] = []
        for i, a in enumerate(self.axes):
            if a == "Y":
                index.append(slice(window.row_off, window.row_stop))
            elif a == "X":
                index.append(slice(window.col_off, window.col_stop))
            else:
                index.append(slice(None) if i == self.band_axis else 0)
        data = np.asarray(arr[tuple(index)])
        kept = [a for i, a in enumerate(self.axes) if a in "YX" or i == self.band_axis]
        order = [kept.index(self.axes[self.band_axis])] if self.band_axis is not None else []
        order += [kept.index("Y"), kept.index("X")]
        data = data.transpose(order)
        if self.band_axis is None:
            data = data[np.newaxis]
        return np.ascontiguousarray(data)


def _tiff_open(path: Path) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as err:
        raise SourceError(
            f"cannot read TIFF {str(path)!r} ({_one_line(err)}): check the file is a complete TIFF"
        ) from None


def _tiff_level_array(tif: Any, level: int) -> Any:
    import zarr

    store = tif.series[0].aszarr(level=level)
    return zarr.open_array(store, mode="r")


def _tiff_bands(tif: Any, page: Any, nbands: int, from_samples: bool) -> tuple[str, ...]:
    if nbands == 1:
        return ("gray",)
    photometric = int(page.photometric)
    if from_samples and photometric in (2, 6) and nbands in (3, 4):  # RGB, YCbCr (decoded)
        return ("red", "green", "blue", "alpha")[:nbands]
    if tif.is_ome:
        names = _ome_channel_names(tif.ome_metadata)
        if len(names) == nbands and all(names):
            return _unique(names)
    return tuple(f"band{i}" for i in range(1, nbands + 1))


def _tiff_has_alpha(page: Any, nbands: int) -> bool:
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    # EXTRASAMPLE 1 = associated (premultiplied) alpha, 2 = unassociated alpha
    return nbands in (2, 4) and bool(extras) and extras[-1] in (1, 2)


def _tiff_block(page: Any) -> tuple[int, int]:
    if page.is_tiled:
        return (int(page.tilelength), int(page.tilewidth))
    rows = int(page.rowsperstrip or page.imagelength)
    return (min(rows, int(page.imagelength)), int(page.imagewidth))


class _TiffBase(Source):
    """Shared tifffile machinery: one Zarr array over the chosen level, read by window."""

    def _probe_tiff(
        self,
    ) -> tuple[Any, _TiffLayout, list[tuple[int, int]], str, int, tuple[int, int]]:
        tif = _tiff_open(self.path)
        try:
            series = tif.series[0]
            levels = series.levels
            if self.level >= len(levels):
                raise self._level_error(len(levels))
            shapes = []
            for lvl in levels:
                _TiffLayout.of(lvl.axes, tuple(lvl.shape), self.path)  # each level is 2-D
                shapes.append(
                    (int(lvl.shape[lvl.axes.index("Y")]), int(lvl.shape[lvl.axes.index("X")]))
                )
            lvl = levels[self.level]
            lay = _TiffLayout.of(lvl.axes, tuple(lvl.shape), self.path)
            nbands = 1 if lay.band_axis is None else int(lvl.shape[lay.band_axis])
            page = lvl.pages[0] if lvl.pages else series.pages[0]
            return tif, lay, shapes, str(np.dtype(lvl.dtype)), nbands, _tiff_block(page)
        except BaseException:
            tif.close()
            raise

    def _open_handle(self) -> Any:
        tif = _tiff_open(self.path)
        try:
            return _TiffHandle(tif, _tiff_level_array(tif, self.level))
        except Exception as err:
            tif.close()
            raise SourceError(
                f"cannot read level {self.level} of {str(self.path)!r} "
                f"({_one_line(err)}): check the file is complete"
            ) from None

    def _pixels(self, window: Window) -> np.ndarray:
        cached = getattr(self._local, "last", None)
        if cached is not None and cached[0] == window:
            return cached[1]
        try:
            data = self._layout.take(self._handle().array, window)
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(
                f"reading {window} of {self.info.uri!r} failed ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        self._local.last = (window, data)
        return data

    def _read(self, window: Window) -> np.ndarray:
        return self._pixels(window).copy()

    _layout: _TiffLayout


class TiffSlideSource(_TiffBase):
    """Tiled/pyramidal TIFF, SVS and OME-TIFF slides through tifffile (Zarr by window).

    Levels are tifffile's ``series[0].levels`` (SubIFD or page pyramids). Microns per pixel
    come from OME ``PhysicalSizeX/Y`` (converted to µm), else the Aperio ``MPP`` entry, else
    the TIFF resolution when its unit is the centimetre.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        tif, self._layout, shapes, dtype, nbands, block = self._probe_tiff()
        try:
            page0 = tif.series[0].levels[0].pages[0]
            bands = _tiff_bands(tif, page0, nbands, "S" in self._layout.axes)
            self._alpha = _tiff_has_alpha(page0, nbands)
            mpp_x, mpp_y, objective, vendor = _tiff_slide_meta(tif, page0)
            rgb8 = dtype == "uint8" and bands[:3] == ("red", "green", "blue")
            self.threshold: int | None = None
            if rgb8:
                thumb = _tiff_thumbnail(tif, shapes, self.path)
                self.threshold = _slide_threshold(
                    thumb[:3], thumb[3] if self._alpha and thumb.shape[0] > 3 else None
                )
        finally:
            tif.close()
        h, w = shapes[self.level]
        h0, w0 = shapes[0]
        self.info = SourceInfo(
            uri=str(self.path),
            kind="slide",
            height=h,
            width=w,
            bands=bands,
            dtype=dtype,
            nodata=None,
            block=block,
            georef=None,
            slide=SlideInfo(
                mpp_x=None if mpp_x is None else mpp_x * (w0 / w),
                mpp_y=None if mpp_y is None else mpp_y * (h0 / h),
                objective_power=objective,
                vendor=vendor,
                level=self.level,
                downsample=(w0 / w + h0 / h) / 2,
            ),
            level_shapes=tuple(shapes),
        )

    def _read_valid(self, window: Window) -> np.ndarray:
        px = self._pixels(window)
        alpha = px[-1] if self._alpha else None
        if self.threshold is None:
            return np.ones(window.shape, bool) if alpha is None else alpha > 0
        return tissue_mask(px[:3], self.threshold, alpha)


def _tiff_thumbnail(tif: Any, shapes: list[tuple[int, int]], path: Path) -> np.ndarray:
    """A thumbnail of the smallest level of a tifffile pyramid (see :func:`_thumbnail`)."""
    last = len(shapes) - 1
    lvl = tif.series[0].levels[last]
    lay = _TiffLayout.of(lvl.axes, tuple(lvl.shape), path)
    arr = _tiff_level_array(tif, last)
    return _thumbnail(lambda win: lay.take(arr, win), *shapes[last])


def _thumbnail(read: Callable[[Window], np.ndarray], h: int, w: int) -> np.ndarray:
    """A ``(band, rows, cols)`` thumbnail, at most about ``_THUMB_SIDE`` pixels a side.

    An image of up to 4096 x 4096 pixels is read in strips and subsampled; a larger one (a
    slide with no small level) by an 8 x 8 grid of 256-pixel windows, so the cost stays
    bounded whatever the slide's size.
    """
    if h * w <= 4096 * 4096:
        step = max(1, math.ceil(max(h, w) / _THUMB_SIDE))
        rows = step * max(1, 512 // step)
        strips = [
            read(Window(r, 0, min(rows, h - r), w))[:, ::step, ::step] for r in range(0, h, rows)
        ]
        return np.concatenate(strips, axis=1)
    side, n = 256, 8
    parts = []
    for r in np.linspace(0, h - side, n).astype(int):
        row = [
            read(Window(int(r), int(c), side, side))[:, ::2, ::2]
            for c in np.linspace(0, w - side, n).astype(int)
        ]
        parts.append(np.concatenate(row, axis=2))
    return np.concatenate(parts, axis=1)


def _tiff_slide_meta(tif: Any, page: Any) -> tuple[float | None, float | None, float | None, str]:
    mpp_x = mpp_y = objective = None
    vendor = "generic-tiff"
    if tif.is_ome:
        vendor = "ome"
        mpp_x, mpp_y, objective = _ome_physical_size(tif.ome_metadata)
    elif tif.is_svs:
        from tifffile.tifffile import svs_description_metadata

        vendor = "aperio"
        try:
            meta = svs_description_metadata(page.description)
        except Exception:
            meta = {}
        mpp = _float_or_none(meta.get("MPP"))
        mpp_x = mpp_y = mpp
        objective = _float_or_none(meta.get("AppMag"))
    if mpp_x is None and int(page.resolutionunit) == 3:  # RESUNIT.CENTIMETER
        rx, ry = page.resolution
        if rx > 0 and ry > 0:
            mpp_x, mpp_y = 1e4 / rx, 1e4 / ry
    return mpp_x, mpp_y, objective, vendor


_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "pm": 1e-6,
    "Å": 1e-4,
}


def _ome_root(xml: str | None) -> ET.Element | None:
    if not xml:
        return None
    try:
        return ET.fromstring(xml)
    except ET.ParseError:
        return None


def _ome_physical_size(xml: str | None) -> tuple[float | None, float | None, float | None]:
    root = _ome_root(xml)
    if root is None:
        return None, None, None
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    sizes: list[float | None] = [None, None]
    if pixels is not None:
        for i, axis in enumerate("XY"):
            value = _float_or_none(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            factor = _UNIT_TO_UM.get(unit)
            sizes[i] = None if value is None or factor is None else value * factor
    objective = next(
        (
            _float_or_none(e.get("NominalMagnification"))
            for e in root.iter()
            if e.tag.endswith("}Objective") and e.get("NominalMagnification")
        ),
        None,
    )
    return sizes[0], sizes[1], objective


def _ome_channel_names(xml: str | None) -> list[str]:
    root = _ome_root(xml)
    if root is None:
        return []
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels")), None)
    if pixels is None:
        return []
    return [c.get("Name", "") for c in pixels if c.tag.endswith("}Channel")]


# ------------------------------------------------------------------------- plain images
_PIL_MODES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    # mode: (dtype, bands, convert to)
    "1": ("uint8", ("gray",), "L"),
    "L": ("uint8", ("gray",), None),
    "LA": ("uint8", ("gray", "alpha"), None),
    "P": ("uint8", ("red", "green", "blue"), "RGB"),
    "PA": ("uint8", ("red", "green", "blue", "alpha"), "RGBA"),
    "RGB": ("uint8", ("red", "green", "blue"), None),
    "RGBA": ("uint8", ("red", "green", "blue", "alpha"), None),
    "RGBX": ("uint8", ("red", "green", "blue"), "RGB"),
    "CMYK": ("uint8", ("cyan", "magenta", "yellow", "black"), None),
    "YCbCr": ("uint8", ("red", "green", "blue"), "RGB"),
    "I;16": ("uint16", ("gray",), None),
    "I;16L": ("uint16", ("gray",), None),
    "I;16B": ("uint16", ("gray",), None),
    "I": ("int32", ("gray",), None),
    "F": ("float32", ("gray",), None),
}


class PlainImageSource(_TiffBase):
    """A plain pixel grid with no georeference: PNG/JPEG (Pillow) or a TIFF (tifffile).

    PNG and JPEG cannot be read by window: the whole image is decoded on the first read and
    cached in memory, so use them only for small images (convert large ones to a tiled TIFF
    or COG). A TIFF is read window by window through Zarr. Palette images become RGB(A).
    Gray pictures stored as RGB(A) keep all their bands. ``read_valid`` is ``alpha > 0``
    when there is an alpha band, else all True.
    """

    def __init__(self, path: str | Path, level: int = 0) -> None:
        super().__init__(path, level)
        self._backend: Literal["pil", "tiff"]
        head = _head(self.path)
        if head.startswith(_TIFF_MAGICS):
            self._backend = "tiff"
            tif, self._layout, shapes, dtype, nbands, block = self._probe_tiff()
            try:
                page0 = tif.series[0].levels[0].pages[0]
                bands = _tiff_bands(tif, page0, nbands, "S" in self._layout.axes)
                self._alpha = _tiff_has_alpha(page0, nbands)
            finally:
                tif.close()
            h, w = shapes[self.level]
        else:
            self._backend = "pil"
            dtype, bands, h, w = self._probe_pil()
            shapes, block = [(h, w)], (h, w)
            self._alpha = bands[-1] == "alpha"
        self.info = SourceInfo(
            uri=str(self.path),
            kind="image",
            height=h,
            width=w,
            bands=bands,
            dtype=dtype,
            nodata=None,
            block=block,
            georef=None,
            slide=None,
            level_shapes=tuple(shapes),
        )

    # ----------------------------------------------------------------------- Pillow
    def _probe_pil(self) -> tuple[str, tuple[str, ...], int, int]:
        from PIL import Image

        if self.level != 0:
            raise self._level_error(1)
        try:
            with Image.open(self.path) as img:
                mode, (w, h) = img.mode, img.size
                fmt = img.format
            with Image.open(self.path) as img:
                img.verify()  # PNG: checks every chunk's CRC, so truncation shows up now
        except Image.DecompressionBombError as err:
            raise SourceError(
                f"{str(self.path)!r} is too large for a PNG/JPEG source "
                f"({_one_line(err)}): convert it to a tiled TIFF or COG"
            ) from None
        except Exception as err:
            raise SourceError(
                f"cannot decode image {str(self.path)!r} ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        spec = _PIL_MODES.get(mode)
        if spec is not None:
            return spec[0], spec[1], h, w
        log.debug(
            "unusual Pillow mode %s (%s) in %s: decoding to learn the layout", mode, fmt, self.path
        )
        arr = self._decode_pil()
        return str(arr.dtype), tuple(f"band{i}" for i in range(1, arr.shape[0] + 1)), h, w

    def _decode_pil(self) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.path) as img:
                spec = _PIL_MODES.get(img.mode)
                if spec is not None and spec[2] is not None:
                    conv = img.convert(spec[2])
                else:
                    img.load()
                    conv = img
                arr = np.asarray(conv)
        except Exception as err:
            raise SourceError(
                f"cannot decode image {str(self.path)!r} ({_one_line(err)}): "
                "check the file is complete"
            ) from None
        arr = arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))

    def _open_handle(self) -> Any:
        if self._backend == "tiff":
            return super()._open_handle()
        return self._decode_pil()

    def _close_handle(self, handle: Any) -> None:
        if self._backend == "tiff":
            handle.close()

    def _read(self, window: Window) -> np.ndarray:
        if self._backend == "pil":
            return self._full()[(slice(None), *window.slices)].copy()
        return super()._read(window)

    def _full(self) -> np.ndarray:
        # one decoded copy per process, shared by threads
        handle = self._handles.get(0)
        if handle is None:
            with self._lock:
                handle = self._handles.get(0)
                if handle is None:
                    handle = self._decode_pil()
                    self._handles[0] = handle
        return handle

    def _read_valid(self, window: Window) -> np.ndarray:
        if not self._alpha:
            return np.ones(window.shape, dtype=bool)
        px = self._full()[-1][window.slices] if self._backend == "pil" else self._pixels(window)[-1]
        return np.asarray(px > 0)


# ------------------------------------------------------------------------------ dispatch
def open_source(uri: str | Path, *, level: int = 0, max_pixels: int | None = None) -> Source:
    """Open an image file for window reads, choosing the reader by content.

    Parameters
    ----------
    uri : a local path (or ``file://`` URI) to a GeoTIFF/COG/VRT, a whole-slide image, a TIFF,
        PNG or JPEG.
    level : pyramid level to read (0 = full resolution).
    max_pixels : the largest full-resolution image (width x height, as the file's header
        declares it) to accept; None: :func:`max_pixels` (``$SEGFLOW_MAX_PIXELS``, else
        :data:`DEFAULT_MAX_PIXELS`). Checked before any pixel is read.

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
    path = _local_path(uri)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise SourceError(f"level must be an integer >= 0, got {level!r}: pass e.g. level=0")
    limit = _max_pixels_arg(max_pixels)
    head = _head(path)
    size = declared_size(path, head)
    if size is not None:
        check_pixel_budget(path, *size, limit=limit)
    is_tiff = head.startswith(_TIFF_MAGICS)
    if is_tiff:
        check_tiff_complete(path)
    source = _dispatch(path, head, is_tiff, level)
    if source is not None:
        # again from the reader's own view, for headers declared_size could not parse
        h, w = max(source.info.level_shapes, key=lambda s: s[0] * s[1])
        try:
            check_pixel_budget(path, w, h, limit=limit)
        except SourceError:
            source.close()
            raise
        return source
    raise SourceError(
        f"cannot open {str(path)!r}: no image reader recognises it (it starts with "
        f"{head[:12]!r}): pass a GeoTIFF, COG, VRT, whole-slide image (SVS, NDPI, MRXS, "
        "OME-TIFF, ...), TIFF, PNG or JPEG"
    )


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


def _open_tiff(path: Path, level: int) -> Source:
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
    vendor = _openslide_vendor(path) if rgb8 else None
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
    return PlainImageSource(path, level)


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
        if head.startswith(_TIFF_MAGICS):
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


def _gdal_has_crs(path: Path) -> bool:
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


def _openslide_vendor(path: Path) -> str | None:
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


# ------------------------------------------------------------------------------- hashing
def source_sha256(uri: str | Path) -> str:
    """The SHA-256 content hash of a source (hex).

    A file hashes its bytes. A VRT hashes its XML followed by the hashes of the files it
    refers to, in document order (recursively), so editing a tile changes the mosaic's hash.

    Examples
    --------
    >>> source_sha256("data/samples/landsat/RGB.byte.tif")[:8]  # doctest: +SKIP
    '...'
    """
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
            if _head(ref, 4).startswith(_TIFF_MAGICS):
                check_tiff_complete(ref)
        refs.append(ref)
    return refs


# ------------------------------------------------------------------------------- helpers
def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _unique(names: Any) -> tuple[str, ...]:
    """Band names made unique by suffixing repeats with their 1-based position."""
    out = [str(n) for n in names]
    dup = {n for n in out if out.count(n) > 1}
    return tuple(f"{n}_{i}" if n in dup else n for i, n in enumerate(out, 1))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
