"""OME-Zarr (NGFF 0.4) label images for slide viewers (napari, OMERO, vizarr), streamed.

The labels become a multiscale *label image* in the standard layout: an image group whose
``labels/`` subgroup lists ``labels/<name>/``, which holds the levels ``0``, ``1`` ... (Zarr
format 2, ``/``-separated chunk keys, as NGFF 0.4 requires), their ``multiscales`` metadata
(axes ``y``, ``x`` in micrometres; scale ``mpp * 2**level``) and the ``image-label`` metadata
(a colour and a name per class). The levels are those of :func:`write_ome_tiff_labels`, with
the same level plan and the same 2 x 2 ``mode`` vote: level 0 is copied from the input window
by window while level 1 is voted from it, and each lower level is voted from the one above,
so memory is bounded by a window, never by a level.

The root of the output is an image group, because readers (``ome-zarr``'s ``Reader``,
napari-ome-zarr) find label images only under an image. segflow has no slide pixels there,
so that image is a placeholder: uint8, the labels' levels, shapes and scales, and no chunk
written (it reads as zeros and costs a few bytes of metadata); the label image's
``image-label`` names it (``"../../"``) as its source. Pixels at ``nodata`` are the arrays'
fill value (chunks of nodata only are not stored) and get a transparent colour.

The metadata is written here with ``zarr`` rather than with the ``ome-zarr`` package: its
writer takes the whole pyramid as (dask) arrays and pulls ``s3fs`` and ``aiohttp`` into the
runtime, for a few JSON documents. The tests read the result with ``ome-zarr``'s reader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segflow.config import ClassDef
from segflow.errors import ConfigError
from segflow.geometry import Window
from segflow.io.export._common import (
    IdChecker,
    iter_windows,
    publish_directory,
    read_window,
    scratch_path,
)
from segflow.io.export._inputs import ClassRaster, check_class_raster
from segflow.io.export.ometiff import _check_options, _halve, _Levels, _plan_levels

__all__ = ["write_ome_zarr_labels"]

log = logging.getLogger(__name__)

_DTYPES = ("uint8", "uint16", "uint32")
NGFF_VERSION = "0.4"
_DOWNSAMPLING = {
    "mode": "each pixel: the most frequent class of its 2 x 2 block above (ties: top-left)",
    "nearest": "each pixel: the top-left pixel of its 2 x 2 block above",
}


def write_ome_zarr_labels(
    labels: Any,
    path: str | Path,
    *,
    classes: Iterable[ClassDef | Mapping[str, Any]],
    mpp_x: float | None,
    mpp_y: float | None,
    nodata: int | None = 255,
    tile: int = 512,
    levels: int | None = None,
    method: Literal["mode", "nearest"] = "mode",
    window: int = 2048,
    name: str = "classes",
    check_classes: bool = True,
) -> Path:
    """Write a 2-D class-id array as an OME-Zarr 0.4 multiscale label image.

    The label image is ``labels/<name>/``, under a placeholder image (see the module notes).

    Parameters
    ----------
    labels
        ``(y, x)`` uint8/uint16/uint32 class ids, any array-like with slicing (read by window).
    path
        The output directory (``.ome.zarr``); built under a temporary name beside it and
        moved into place at the end, replacing an older Zarr group there.
    classes
        The class table: colours and names in ``image-label``, the table as ``segflow``.
    mpp_x, mpp_y
        Level-0 pixel size in micrometres, both or neither (``None``: scales in pixels).
    nodata
        The value of pixels outside the prediction (must not be a class id), or ``None``.
    tile
        Chunk side of every level (multiple of 16).
    levels
        Number of levels including level 0; default: halve until one tile holds a level.
    method
        ``"mode"`` of 2 x 2 cells (default) or ``"nearest"``: lower levels hold class ids only.
    window
        Side of the windows read from ``labels`` and from each level (memory bound).
    name
        Name of the label image (``labels/<name>``).
    check_classes
        Fail with :class:`~segflow.errors.LabelError` on values neither in the table nor nodata.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        Bad labels, classes, nodata or options; ``path`` is a file or a non-Zarr directory.

    Examples
    --------
    >>> import tempfile, numpy as np, zarr
    >>> lab = np.zeros((100, 80), "uint8"); lab[20:60, 10:30] = 1
    >>> p = write_ome_zarr_labels(lab, tempfile.mkdtemp() + "/l.ome.zarr", mpp_x=0.5, mpp_y=0.5,
    ...                           classes=[{"id": 0, "name": "bg"}, {"id": 1, "name": "x"}],
    ...                           tile=32)
    >>> group = zarr.open_group(p / "labels" / "classes", mode="r")
    >>> [group[str(k)].shape for k in range(3)]
    [(100, 80), (50, 40), (25, 20)]
    >>> group.attrs["image-label"]["properties"][1]
    {'label-value': 1, 'name': 'x'}
    """
    raster = check_class_raster(labels, classes, nodata, allowed=_DTYPES)
    _check_options(tile, levels, method, mpp_x, mpp_y)
    mpp = _check_zarr_options(mpp_x, mpp_y, name)
    layout = _plan_levels(raster.shape, tile, levels, window)
    out = Path(path)
    _check_target(out)
    with scratch_path(out, ".zarr") as tmp:
        arrays = _create_groups(tmp, name, layout, raster, mpp, method)
        _write_levels(labels, arrays, layout, raster, method, raster.checker(check_classes))
        publish_directory(tmp, out)
    log.debug("wrote OME-Zarr labels %s with %d levels", out, len(layout.shapes))
    return out


def _check_zarr_options(
    mpp_x: float | None, mpp_y: float | None, name: str
) -> tuple[float, float] | None:
    """The level-0 pixel size ``(y, x)`` (``None``: unknown) and a usable label name."""
    if (mpp_x is None) != (mpp_y is None):
        raise ConfigError(
            f"pass both mpp_x and mpp_y or neither, got mpp_x={mpp_x}, mpp_y={mpp_y}: "
            "OME-Zarr scales every axis in the same unit"
        )
    if not name or name in (".", "..", "labels") or "/" in name or "\\" in name:
        raise ConfigError(f"name must be a plain group name such as 'classes', got {name!r}")
    return None if mpp_x is None or mpp_y is None else (float(mpp_y), float(mpp_x))


def _check_target(out: Path) -> None:
    """``out`` may be new, or an older Zarr group (replaced); nothing else is overwritten."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(
            f"output path {str(out)!r} is a file: an OME-Zarr is a directory, choose another path"
        )
    if not ((out / ".zgroup").is_file() or (out / "zarr.json").is_file()):
        raise ConfigError(
            f"output path {str(out)!r} is a directory but not a Zarr group: it is not "
            "replaced; choose another path or remove it"
        )


def _multiscales(
    name: str, layout: _Levels, mpp: tuple[float, float] | None, method: str
) -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` entry: axes ``y``, ``x`` and one scale per level."""
    unit = {"unit": "micrometer"} if mpp is not None else {}
    base_y, base_x = mpp if mpp is not None else (1.0, 1.0)
    return {
        "version": NGFF_VERSION,
        "name": name,
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": [
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [base_y * 2**k, base_x * 2**k]}
                ],
            }
            for k in range(len(layout.shapes))
        ],
        "type": method,
        "metadata": {
            "description": _DOWNSAMPLING[method],
            "method": "segflow.io.export._common.downsample_mode2",
        },
    }


def _image_label(raster: ClassRaster) -> dict[str, Any]:
    """NGFF 0.4 ``image-label``: a colour and a name per class; nodata is transparent."""
    classes = raster.table.classes
    colors = [{"label-value": c.id, "rgba": [*c.rgb, 255]} for c in classes]
    if raster.nodata is not None:
        colors.append({"label-value": raster.nodata, "rgba": [0, 0, 0, 0]})
    return {
        "version": NGFF_VERSION,
        "colors": colors,
        "properties": [{"label-value": c.id, "name": c.name} for c in classes],
        "source": {"image": "../../"},
    }


def _create_groups(
    root: Path,
    name: str,
    layout: _Levels,
    raster: ClassRaster,
    mpp: tuple[float, float] | None,
    method: str,
) -> list[Any]:
    """The groups, their metadata and the (empty) arrays; returns the label levels."""
    import zarr

    image = zarr.open_group(str(root), mode="w", zarr_format=2)
    _create_levels(image, layout, np.dtype("uint8"), 0)  # the placeholder image: no chunks
    image.attrs["multiscales"] = [_multiscales("image (placeholder)", layout, mpp, method)]
    labels_group = image.create_group("labels")
    labels_group.attrs["labels"] = [name]
    group = labels_group.create_group(name)
    fill = 0 if raster.nodata is None else raster.nodata
    arrays = _create_levels(group, layout, raster.dtype, fill)
    group.attrs.update(
        {
            "multiscales": [_multiscales(name, layout, mpp, method)],
            "image-label": _image_label(raster),
            "segflow": {
                "kind": "labels",
                "nodata": raster.nodata,
                "classes": [c.model_dump() for c in raster.table.classes],
            },
        }
    )
    return arrays


def _create_levels(group: Any, layout: _Levels, dtype: np.dtype[Any], fill: int) -> list[Any]:
    """One Zarr v2 array per level in ``group`` (``0``, ``1`` ...), chunked ``tile``."""
    from numcodecs import Blosc

    compressor = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
    return [
        group.create_array(
            str(k),
            shape=(h, w),
            dtype=dtype,
            chunks=(min(layout.tile, h), min(layout.tile, w)),
            fill_value=fill,
            compressors=compressor,
            chunk_key_encoding={"name": "v2", "separator": "/"},  # NGFF 0.4: "/" keys
        )
        for k, (h, w) in enumerate(layout.shapes)
    ]


def _write_levels(
    labels: Any,
    arrays: list[Any],
    layout: _Levels,
    raster: ClassRaster,
    method: Literal["mode", "nearest"],
    checker: IdChecker | None,
) -> None:
    """Level 0 copied (and checked) window by window while level 1 is voted from the same
    windows; each lower level voted from the one above."""
    level0 = arrays[0]

    def copy(block: np.ndarray, win: Window) -> None:
        if checker is not None:
            checker(block, win)
        level0[win.slices] = block

    height, width = raster.shape
    if len(arrays) == 1:
        for win in iter_windows(height, width, layout.window):
            copy(read_window(labels, win), win)
        return
    _halve(labels, arrays[1], (height, width), layout.window, method, raster.nodata, copy)
    for k in range(2, len(arrays)):
        above = layout.shapes[k - 1]
        _halve(arrays[k - 1], arrays[k], above, layout.window, method, raster.nodata, None)
