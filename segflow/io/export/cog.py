"""Cloud-Optimized GeoTIFFs of class ids and class probabilities, streamed window by window.

GDAL's COG driver only has ``CreateCopy``: given an in-memory raster it would buffer the whole
mask. So the writers stream the array window by window into a tiled BigTIFF *staging* file
(one process, one GDAL handle), build its overviews there (``mode`` for class ids, so every
overview pixel is a real class id; ``average`` for probabilities), then let the COG driver copy
it, with ``GDAL_CACHEMAX`` bounded. Memory is bounded by the read window and the cache, not by
the raster. The staging file and the COG are written under temporary names beside the output
and the COG is moved into place last, so a crash never leaves a half-written file at ``path``.

Class names: rasterio cannot write a GDAL raster attribute table, so the class table travels as
GDAL metadata: band description ``"class"``, band tags ``CLASS_<id>=<name>`` and a dataset tag
``SEGFLOW_CLASSES`` (JSON of the whole table); colours go in the TIFF colour table. The class
COG also gets a PAM sidecar ``<path>.aux.xml`` with the band's category names, which QGIS shows
in its legend (see :mod:`segflow.io.export._pam`); it is published just before the COG.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.export._common import (
    ClassTable,
    atomic_output,
    check_labels,
    downsample_mode2,
    iter_windows,
    read_window,
    scratch_path,
)
from segflow.io.export._inputs import ClassRaster, check_class_raster
from segflow.io.export._pam import pam_sidecar as _sidecar
from segflow.io.store import GeoRef
from segflow.tiling import round_up

__all__ = ["overview_factors", "write_cog", "write_probability_cog"]

log = logging.getLogger(__name__)

Compression = Literal["deflate", "zstd", "lzw"]
LabelResampling = Literal["mode", "nearest"]
ProbResampling = Literal["average", "bilinear", "nearest", "mode"]

_LABEL_DTYPES = ("uint8", "uint16")
_STAGING_COMPRESS = "ZSTD"  # fast, lossless; the staging file only lives during the export


def overview_factors(height: int, width: int, block: int) -> list[int]:
    """Decimation factors 2, 4, 8 ... until the smallest overview fits in one block.

    Examples
    --------
    >>> overview_factors(900, 900, 256)
    [2, 4]
    >>> overview_factors(100, 100, 512)
    []
    """
    factors: list[int] = []
    f = 2
    while max(height, width) > block * (f // 2):
        factors.append(f)
        f *= 2
    return factors


def _check_block(block: int) -> int:
    if block < 16 or block % 16:
        raise ConfigError(
            f"block must be a multiple of 16 and >= 16 (TIFF tiles), got {block}: use 512"
        )
    return int(block)


def _compress(compress: str) -> str:
    value = compress.upper()
    if value not in {"DEFLATE", "ZSTD", "LZW"}:
        raise ConfigError(f"compress must be 'deflate', 'zstd' or 'lzw', got {compress!r}")
    return value


_LEVELS = {"DEFLATE": 12, "ZSTD": 22}  # GDAL's highest level per codec (libdeflate, zstd)


def _level_options(compress: str, level: int | None) -> dict[str, str]:
    """GDAL's ``LEVEL`` creation option, checked against the codec (LZW has no levels)."""
    if level is None or compress == "LZW":
        return {}
    top = _LEVELS[compress]
    if not 1 <= level <= top:
        raise ConfigError(f"{compress} level must be in 1..{top}, got {level}: use e.g. 1 (fast)")
    return {"LEVEL": str(level)}


def _georef_profile(georef: GeoRef | None) -> dict[str, Any]:
    if georef is None:
        return {}
    from rasterio.crs import CRS

    crs = CRS.from_epsg(georef.epsg) if georef.epsg else CRS.from_wkt(georef.crs_wkt)
    return {"crs": crs, "transform": georef.affine()}


class _ModePyramid:
    """Overview levels of a streamed class raster, one tiled GTiff per factor.

    Windows must arrive with offsets divisible by the largest factor; each level is the
    :func:`~segflow.io.export._common.downsample_mode2` of the one above it. :meth:`vrt` wraps the staging file and the
    levels as one VRT whose ``<Overview>`` elements the COG driver copies as they are.
    """

    def __init__(self, staging: Path, factors: list[int], profile: Mapping[str, Any]) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.factors = factors
        nodata = profile.get("nodata")
        self.nodata = None if nodata is None else int(nodata)
        self.paths = [staging.with_name(f"{staging.stem}.ov{f}.tif") for f in factors]
        base = {k: v for k, v in profile.items() if k not in ("crs", "transform")}
        with warnings.catch_warnings():  # overview levels take the VRT's georeference
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.levels = [
                rasterio.open(
                    path,
                    "w",
                    **{**base, "height": -(-base["height"] // f), "width": -(-base["width"] // f)},
                )
                for f, path in zip(factors, self.paths, strict=True)
            ]

    def add(self, data: np.ndarray, win: Window) -> None:
        from rasterio.windows import Window as RioWindow

        level = data
        for f, dst in zip(self.factors, self.levels, strict=True):
            level = downsample_mode2(level, nodata=self.nodata)
            h, w = level.shape
            dst.write(level[None], window=RioWindow(win.col_off // f, win.row_off // f, w, h))

    def close(self) -> None:
        for dst in self.levels:
            dst.close()

    def __enter__(self) -> _ModePyramid:
        return self

    def __exit__(self, *exc: object) -> None:  # scratch files: always removed
        self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def vrt(self, staging: Path, vrt: Path) -> Path:
        """A VRT of ``staging`` (its metadata, colours, georeference) with these overviews."""
        import xml.etree.ElementTree as ET

        import rasterio.shutil

        rasterio.shutil.copy(staging, vrt, driver="VRT")
        tree = ET.parse(vrt)
        for band in tree.getroot().iter("VRTRasterBand"):
            for path in self.paths:
                ov = ET.SubElement(band, "Overview")
                ET.SubElement(ov, "SourceFilename", relativeToVRT="0").text = str(path.absolute())
                ET.SubElement(ov, "SourceBand").text = band.get("band", "1")
        tree.write(vrt)
        return vrt


def _read_ahead(
    pool: ThreadPoolExecutor, windows: Iterable[Window], load: Callable[[Window], np.ndarray]
) -> Iterator[tuple[Window, np.ndarray]]:
    """``(window, load(window))`` in order, the next window loading on ``pool`` meanwhile."""
    it = iter(windows)
    win = next(it, None)
    fut = pool.submit(load, win) if win is not None else None
    while fut is not None and win is not None:
        data = fut.result()
        nxt = next(it, None)
        fut = pool.submit(load, nxt) if nxt is not None else None
        yield win, data
        win = nxt


def _env(cache_mb: int, threads: int | str) -> Any:
    import rasterio

    return rasterio.Env(
        GDAL_CACHEMAX=int(cache_mb),  # < 100000 is read as MiB
        GDAL_PAM_ENABLED="NO",  # no stray .aux.xml beside the temporary files
        GDAL_NUM_THREADS=str(threads),
    )


_Hook = Callable[[np.ndarray, Window], None]


@dataclass(frozen=True)
class _CogOptions:
    """How a COG is tiled, compressed and written (values already checked).

    ``compress`` is GDAL's codec name (upper case), ``level`` its level (``None``: GDAL's
    default); ``predictor`` is the TIFF predictor: 1 none (class ids), 2 horizontal
    differencing (integer scores), 3 floating point.
    """

    block: int
    resampling: str
    compress: str
    level: int | None
    read_size: int
    cache_mb: int
    threads: int | str
    predictor: int = 1


@dataclass(frozen=True)
class _CogContent:
    """What a COG holds: the raster's shape, dtype, georeference and nodata, and its metadata."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    georef: GeoRef | None
    nodata: float | None
    tags: Mapping[str, str]
    band_tags: Mapping[int, Mapping[str, str]]
    descriptions: Sequence[str]
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None
    category_names: Sequence[str] | None = None  # band 1's, by value: the PAM sidecar


@dataclass(frozen=True)
class _Staging:
    """Layout of the staging file: bands, size, overview factors and read windows."""

    count: int
    height: int
    width: int
    factors: list[int]
    own_overviews: bool  # voted while streaming (mode of one band), not built by GDAL
    read_size: int


def _plan_staging(shape: tuple[int, ...], options: _CogOptions) -> _Staging:
    """The staging layout of a ``(y, x)`` or ``(band, y, x)`` raster of ``shape``."""
    count = shape[0] if len(shape) == 3 else 1
    height, width = shape[-2], shape[-1]
    factors = overview_factors(height, width, options.block)
    own_overviews = options.resampling == "mode" and count == 1 and bool(factors)
    # windows aligned on every overview factor, so each maps to whole overview pixels
    align = math.lcm(options.block, max(factors)) if own_overviews else options.block
    read_size = round_up(max(options.read_size, options.block), align)
    return _Staging(count, height, width, factors, own_overviews, read_size)


def _staging_profile(content: _CogContent, plan: _Staging, block: int) -> dict[str, Any]:
    """The rasterio profile of the tiled, fast-compressed BigTIFF staging file."""
    return {
        "driver": "GTiff",
        "width": plan.width,
        "height": plan.height,
        "count": plan.count,
        "dtype": content.dtype.name,
        "nodata": content.nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": _STAGING_COMPRESS,
        "zstd_level": 1,
        "interleave": "pixel" if plan.count > 1 else "band",
        "BIGTIFF": "YES",
        **_georef_profile(content.georef),
    }


def _pyramid(
    staging: Path, plan: _Staging, profile: Mapping[str, Any]
) -> _ModePyramid | nullcontext[None]:
    """The overview levels voted while streaming, or nothing where GDAL builds them."""
    return _ModePyramid(staging, plan.factors, profile) if plan.own_overviews else nullcontext()


def _loader(src: Any, dtype: np.dtype[Any], check: _Hook | None) -> Callable[[Window], np.ndarray]:
    """A function reading (and checking) one window of ``src`` as ``(band, y, x)`` ``dtype``."""

    def load(win: Window) -> np.ndarray:
        data = read_window(src, win)
        if check is not None:
            check(data, win)
        if data.dtype != dtype:
            data = data.astype(dtype)
        return data if data.ndim == 3 else data[None]

    return load


def _write_windows(
    dst: Any,
    plan: _Staging,
    load: Callable[[Window], np.ndarray],
    pool: ThreadPoolExecutor,
    pyramid: _ModePyramid | None,
) -> int:
    """Stream every window of the raster into ``dst`` and ``pyramid``; the number of windows.

    Three stages on three threads, each in window order: read (+ checks) one window ahead,
    write the staging tile here, vote the overviews behind it.
    """
    from rasterio.windows import Window as RioWindow

    voting: Future[None] | None = None
    n = 0
    for win, data in _read_ahead(pool, iter_windows(plan.height, plan.width, plan.read_size), load):
        dst.write(data, window=RioWindow(win.col_off, win.row_off, win.width, win.height))
        if pyramid is not None:
            if voting is not None:
                voting.result()
            voting = pool.submit(pyramid.add, data[0], win)
        n += 1
    if voting is not None:
        voting.result()
    return n


def _write_metadata(dst: Any, content: _CogContent) -> None:
    """The colour table, band descriptions, dataset tags and band tags of ``content``."""
    if content.colormap is not None:
        dst.write_colormap(1, dict(content.colormap))
    for i, desc in enumerate(content.descriptions, start=1):
        dst.set_band_description(i, desc)
    dst.update_tags(**content.tags)
    for band, btags in content.band_tags.items():
        dst.update_tags(band, **btags)


def _write_overviews(dst: Any, plan: _Staging, resampling: str) -> None:
    """Record the overview resampling; build the overviews unless they were voted already."""
    from rasterio.enums import Resampling

    if plan.factors:
        dst.update_tags(ns="rio_overview", resampling=resampling)
        if not plan.own_overviews:
            dst.build_overviews(plan.factors, Resampling[resampling])


def _copy_to_cog(
    source: Path,
    target: Path,
    options: _CogOptions,
    level_options: Mapping[str, str],
    factors: list[int],
) -> None:
    """Copy the staged ``source`` and its overviews as a COG to ``target``."""
    import rasterio.shutil

    rasterio.shutil.copy(
        source,
        target,
        driver="COG",
        BLOCKSIZE=options.block,
        COMPRESS=options.compress,
        **level_options,
        PREDICTOR="YES" if options.predictor > 1 else "NO",
        BIGTIFF="IF_SAFER",
        OVERVIEWS="FORCE_USE_EXISTING" if factors else "NONE",
        OVERVIEW_RESAMPLING=options.resampling.upper(),
        NUM_THREADS=str(options.threads),
    )


def _stream_to_cog(
    src: Any,
    path: str | Path,
    content: _CogContent,
    options: _CogOptions,
    check: _Hook | None = None,
) -> Path:
    """Stream ``src`` into a staging file, build its overviews, copy it as the COG ``path``."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    # checked before anything is written
    level_options = _level_options(options.compress, options.level)
    plan = _plan_staging(content.shape, options)
    profile = _staging_profile(content, plan, options.block)
    out = Path(path)
    with (
        _sidecar(out, content.category_names) as publish_sidecar,
        atomic_output(out) as tmp_cog,
        scratch_path(out, ".tif") as staging,
        scratch_path(out, ".vrt") as vrt,
        _env(options.cache_mb, options.threads),
        warnings.catch_warnings(),
    ):
        if content.georef is None:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with (
            _pyramid(staging, plan, profile) as pyramid,
            ThreadPoolExecutor(2, thread_name_prefix="segflow-cog") as pool,
        ):
            with rasterio.open(staging, "w", **profile) as dst:
                n = _write_windows(dst, plan, _loader(src, content.dtype, check), pool, pyramid)
                log.debug("staged %d windows of %d px into %s", n, plan.read_size, staging)
                _write_metadata(dst, content)
                _write_overviews(dst, plan, options.resampling)
            source = staging
            if pyramid is not None:  # the COG driver copies the VRT's overviews as they are
                pyramid.close()
                source = pyramid.vrt(staging, vrt)
            _copy_to_cog(source, tmp_cog, options, level_options, plan.factors)
            publish_sidecar()  # then atomic_output moves the COG into place
    return out


def _chain_hooks(*hooks: _Hook | None) -> _Hook | None:
    """One hook calling each of ``hooks`` that is not ``None``, in order (``None`` if none)."""
    active = [h for h in hooks if h is not None]
    if not active:
        return None

    def check(data: np.ndarray, win: Window) -> None:
        for hook in active:
            hook(data, win)

    return check


def _check_label_overviews(resampling: str, raster: ClassRaster) -> None:
    """Overviews of class ids must hold class ids, and the ids must fit the labels' dtype."""
    if resampling not in ("mode", "nearest"):
        raise ConfigError(
            f"overview_resampling for class ids must be 'mode' or 'nearest', got "
            f"{resampling!r}: averaging would invent class ids"
        )
    top = max(raster.table.ids)
    if top > np.iinfo(raster.dtype).max:
        raise ConfigError(f"class ids up to {top} do not fit the labels' {raster.dtype.name}")


def _label_content(raster: ClassRaster, georef: GeoRef | None) -> _CogContent:
    """Class ids: one band ``"class"``, the class table as tags and as the colour table."""
    table = raster.table
    colormap: dict[int, tuple[int, int, int, int]] = {c.id: (*c.rgb, 255) for c in table.classes}
    if raster.nodata is not None:
        colormap[raster.nodata] = (0, 0, 0, 0)
    return _CogContent(
        shape=raster.shape,
        dtype=raster.dtype,
        georef=georef,
        nodata=raster.nodata,
        tags={**table.tags(), "SEGFLOW_KIND": "labels"},
        band_tags={1: table.tags()},
        descriptions=("class",),
        colormap=colormap,
        category_names=[
            table.name(v) if v in table.by_id else "" for v in range(max(table.ids) + 1)
        ],
    )


def write_cog(  # noqa: PLR0913 (public writer: its keyword options are its interface)
    labels: Any,
    path: str | Path,
    *,
    georef: GeoRef | None,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    nodata: int | None = 255,
    block: int = 512,
    overview_resampling: LabelResampling = "mode",
    compress: Compression = "deflate",
    level: int | None = 1,
    read_size: int = 2048,
    cache_mb: int = 64,
    threads: int | str = 1,
    check_classes: bool = True,
    observe: Callable[[np.ndarray, Window], None] | None = None,
) -> Path:
    """Write a 2-D class-id array as a Cloud-Optimized GeoTIFF with a colour table.

    Parameters
    ----------
    labels
        ``(y, x)`` uint8/uint16 class ids; any array-like with numpy slicing (a zarr array is
        read ``read_size`` x ``read_size`` at a time, never whole).
    path
        The output ``.tif``; written under a temporary name and moved into place at the end.
    georef
        CRS and geotransform of ``labels``' pixel grid, or ``None`` (e.g. slides).
    classes
        The class table; colours become the TIFF colour table, names GDAL metadata and the
        category names of the PAM sidecar ``<path>.aux.xml`` (QGIS's legend), written with
        the COG (replacing an older one).
    nodata
        The value of pixels outside the prediction (must not be a class id), or ``None``.
    block
        Tile size of the COG and its overviews (multiple of 16).
    overview_resampling
        ``"mode"`` (default) or ``"nearest"``: overview pixels are always class ids.
    compress
        ``"deflate"`` (most compatible), ``"zstd"`` or ``"lzw"``; no predictor.
    level
        Compression level (DEFLATE 1-12, ZSTD 1-22; ignored for LZW; ``None``: GDAL's
        default, 6 for DEFLATE). Class masks compress so well that level 1 is only about 20 %
        larger than 6 and four times faster to write, so 1 is the default.
    read_size
        Side of the windows read from ``labels`` (rounded up to a multiple of ``block``).
    cache_mb
        ``GDAL_CACHEMAX`` for the export, in MiB.
    threads
        GDAL threads for compression and overviews (``"ALL_CPUS"`` allowed).
    check_classes
        Fail with :class:`~segflow.errors.LabelError` on values neither in the table nor nodata.
    observe
        Called with every window of ``labels`` (and its :class:`~segflow.geometry.Window`) as
        it streams, e.g. to count class pixels without reading the mask a second time.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from segflow.config import ClassDef
    >>> lab = np.zeros((64, 64), "uint8"); lab[10:20, 10:40] = 1
    >>> cls = [ClassDef(id=0, name="bg", color="#000000"), ClassDef(id=1, name="b", color="#ff0000")]
    >>> p = write_cog(lab, tempfile.mkdtemp() + "/m.tif", georef=None, classes=cls, block=32)
    >>> p.name
    'm.tif'
    """
    raster = check_class_raster(labels, classes, nodata, allowed=_LABEL_DTYPES)
    block = _check_block(block)
    _check_label_overviews(overview_resampling, raster)
    options = _CogOptions(
        block, overview_resampling, _compress(compress), level, read_size, cache_mb, threads
    )
    check = _chain_hooks(raster.checker(check_classes), observe)
    return _stream_to_cog(labels, path, _label_content(raster, georef), options, check)


def _probability_dtype(dtype: Any) -> np.dtype[Any]:
    """The COG dtype of scores of ``dtype``: float16 widened to float32 (no half floats)."""
    out = np.dtype(dtype)
    if out == np.float16:
        out = np.dtype("float32")
    if out.name not in ("uint8", "uint16", "float32"):
        raise ConfigError(
            f"probabilities dtype must be uint8, uint16 or float16/32, got {out.name}"
        )
    return out


def _probability_content(
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    georef: GeoRef | None,
    nodata: float | None,
    table: ClassTable,
) -> _CogContent:
    """Class scores: one band per class, named and tagged by its class, and their scale."""
    scale = "255" if dtype == np.uint8 else ("65535" if dtype == np.uint16 else "1")
    return _CogContent(
        shape=shape,
        dtype=dtype,
        georef=georef,
        nodata=nodata,
        tags={**table.tags(), "SEGFLOW_KIND": "probabilities", "SEGFLOW_SCALE": scale},
        band_tags={
            i: {"CLASS_ID": str(c.id), "CLASS_NAME": c.name}
            for i, c in enumerate(table.classes, start=1)
        },
        descriptions=[c.name for c in table.classes],
    )


def write_probability_cog(
    probs: Any,
    path: str | Path,
    *,
    georef: GeoRef | None,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    nodata: float | None = None,
    block: int = 512,
    overview_resampling: ProbResampling = "average",
    compress: Compression = "deflate",
    level: int | None = None,
    read_size: int = 1024,
    cache_mb: int = 64,
    threads: int | str = 1,
) -> Path:
    """Write ``(class, y, x)`` class scores as a COG, one band per class.

    uint8 scores (0..255) are the store's default; uint16 and float32 pass through and
    float16 is widened to float32 (GeoTIFF has no half floats). Band ``i`` is described by the
    name of the ``i``-th class of the table sorted by id. Overviews average by default
    (fine for scores). Memory: one ``(class, read_size, read_size)`` window at a time.
    ``level`` is the compression level (``None``: GDAL's default); the other options are
    those of :func:`write_cog`.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from segflow.config import ClassDef
    >>> p = np.zeros((2, 64, 64), "uint8"); p[1] = 200; p[0] = 55
    >>> cls = [ClassDef(id=0, name="bg"), ClassDef(id=1, name="b")]
    >>> write_probability_cog(p, tempfile.mkdtemp() + "/p.tif", georef=None, classes=cls,
    ...                       block=32).suffix
    '.tif'
    """
    shape = check_labels(probs, what="probabilities", ndim=3)
    table = ClassTable(classes)
    if shape[0] != len(table.classes):
        raise ConfigError(
            f"probabilities have {shape[0]} class bands but the class table has "
            f"{len(table.classes)} classes: pass the table the model was trained with"
        )
    dtype = _probability_dtype(probs.dtype)
    block = _check_block(block)
    if overview_resampling not in ("average", "bilinear", "nearest", "mode"):
        raise ConfigError(f"unknown overview_resampling {overview_resampling!r}")
    options = _CogOptions(
        block=block,
        resampling=overview_resampling,
        compress=_compress(compress),
        level=level,
        read_size=read_size,
        cache_mb=cache_mb,
        threads=threads,
        predictor=3 if dtype.kind == "f" else 2,
    )
    content = _probability_content(shape, dtype, georef, nodata, table)
    return _stream_to_cog(probs, path, content, options)
