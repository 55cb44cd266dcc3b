"""Streaming overlap-tile inference into a chunked prediction store (``segment_region``).

:func:`predict_region` runs a segmentation model over a region of an image too large for
memory and writes ``prediction/probabilities`` and ``prediction/labels`` (DESIGN.md section 3)
into a scene store, one write unit (chunk, or shard when sharded) at a time.

How the work is organised
-------------------------
* The **output** is cut into the store's write units; each unit is written exactly once, by
  one writer, and then marked done in the store's progress record. A killed run resumes: done
  units are skipped, and tiles that feed only done units are not computed. A re-run with the
  same model and options over a finished region does nothing. Different parameters (model
  weights, tile, halo, mode, normalization, ...) reset the prediction arrays.
* The **input** is cut into model windows by a :class:`~segflow.tiling.TileLayout` (``crop``
  or ``gaussian``, see :mod:`segflow.tiling`). Inside the image a window sees real pixels, also
  outside the requested region; only past the image edges is it mirrored (numpy ``reflect``).
* **Merging**: in ``gaussian`` mode each tile's softmax output, times the Gaussian importance
  map, is added to a float32 accumulator of every unit its core overlaps, with the weights
  added to a weight sum; in ``crop`` mode the output is copied in (one tile per pixel). A unit is finished (divided,
  quantized, written, marked) as soon as its last contributing tile has arrived; the count is
  known in advance from the layout. In ``crop`` mode every pixel has exactly one contribution
  of weight 1, so the result is the tile's own output, bit for bit.
* **Bounded memory**: units are processed in column *strips* (``strip_width`` pixels); within
  a strip tiles go row by row, so the open accumulators are those of at most
  ``ceil(window / unit) + 1`` unit rows of one strip, whatever the image size. A ``gaussian``
  window that straddles a strip boundary is computed once for each strip (its contribution
  to the other strip's units is dropped there and recomputed later); that is the price of never
  holding a row of the whole image: about ``(window - stride) / strip_width`` extra tiles
  (3 % for window 512, overlap 0.5, strip 8192; none when the region fits in one strip).
  ``crop`` tiles aligned with the units never straddle.
* **Valid pixels**: each tile's pixels and ``valid`` mask come from one read (a source whose
  mask is its nodata value decodes the window once); a tile with no valid pixel in its core
  is not run, and the units gather their footprint from the tiles' cores, so nothing is read
  twice. A unit that only such tiles cover is written as nodata. A pixel where any band is
  NaN or +/-inf is invalid too, whatever the reader's mask says
  (:func:`~segflow.stats.valid_and_finite`). The model sees every invalid pixel
  (nodata by value, by mask, or non-finite) as one defined value, the normalization mean
  (0 after normalization): NaN never reaches the model, and a nodata pixel's neighbours get
  the same prediction however the pixel was marked nodata.
* **Streaming**: ``read_workers`` threads read and normalize windows ahead (``prefetch``
  batches beyond the one being assembled), each taking the windows of its own column band
  of the strip so that its source handle's block cache serves the source tiles that
  neighbouring windows share (:func:`reader_band`); the calling thread batches tiles
  through the model under ``torch.inference_mode()``, and one writer thread finishes units
  (divide, argmax, quantize, Zarr write, progress mark) while the model runs.

Outputs
-------
``prediction/probabilities`` (class, y, x): ``uint8`` holds ``round(p * 255)`` (numpy
``rint``, half to even; ``value / 255`` recovers ``p`` within ``1/510``), or ``float16``.
``prediction/labels`` (y, x): ``argmax`` over the float32 probabilities (ties to the lower
class id; when only labels are written in ``crop`` mode without TTA, the argmax of the
logits, the same class without a softmax), ``uint8`` (``uint16`` when there are more than
255 classes). Pixels outside ``valid`` get the label ``label_nodata`` (default 255) and
probability 0. A model with a single output channel is read as a binary logit: classes
``(1 - sigmoid, sigmoid)``.

Examples
--------
>>> import tempfile, numpy as np, torch
>>> from segflow.geometry import Window
>>> img = np.random.default_rng(0).random((1, 40, 50), dtype=np.float32)
>>> model = torch.nn.Conv2d(1, 2, 3, padding=1)
>>> out = tempfile.mkdtemp() + "/pred.zarr"
>>> rep = predict_region(ArrayReader(img), model, Window(0, 0, 40, 50), out,
...                      options=InferenceOptions(tile=16, halo=1, device="cpu"),
...                      mean=[0.5], std=[0.3])
>>> rep.tiles, rep.units
(12, 1)
>>> SceneStore.open(out).array("prediction/labels").shape
(40, 50)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segflow.errors import ConfigError, RegionError
from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.infer.forward import _flips, _Forward, _model_hash, _probe_classes, resolve_device
from segflow.infer.merger import _CallbackSink, _UnitWriter
from segflow.infer.options import InferenceOptions, InferenceReport
from segflow.infer.readers import (
    ArrayReader,
    SourceReader,
    StoreReader,
    WindowReader,
    _Normalizer,
)
from segflow.infer.store import (
    _META_KEY,
    _RUN_KEY,
    LABELS,
    PROBABILITIES,
    _store_origin,
    open_prediction_store,
    prediction_arrays,
    prediction_unit,
)
from segflow.infer.stream import _stream, reader_band
from segflow.io.store import SceneStore, publish_store, unpublish_store
from segflow.normalization import Normalization
from segflow.tiling import (
    TileLayout,
    crop_layout,
    gaussian_layout,
)

__all__ = [
    "ArrayReader",
    "SourceReader",
    "InferenceOptions",
    "InferenceReport",
    "StoreReader",
    "WindowReader",
    "build_layout",
    "open_prediction_store",
    "predict_array",
    "predict_units",
    "predict_region",
    "prediction_unit",
    "reader_band",
    "resolve_device",
    "UnitRunner",
]

log = logging.getLogger(__name__)


def build_layout(
    options: InferenceOptions, height: int, width: int, origin: tuple[int, int] = (0, 0)
) -> TileLayout:
    """The tile layout ``options`` give for a ``height`` x ``width`` image."""
    if options.mode == "crop":
        return crop_layout(
            height,
            width,
            tile=options.tile,
            halo=options.halo,
            size_multiple=options.size_multiple,
            origin=origin,
        )
    return gaussian_layout(
        height,
        width,
        window=options.window_size,
        overlap=options.overlap,
        halo=options.halo,
        size_multiple=options.size_multiple,
    )


def _check_inputs(
    reader: WindowReader, region: Window, mean: Sequence[float], std: Sequence[float]
) -> Normalization:
    """Refuse an empty or outside region and statistics that do not fit; the normalization."""
    if region.size == 0:
        raise RegionError(f"region {region} is empty: give a height and width > 0")
    image = Window(0, 0, reader.height, reader.width)
    if not image.contains(region):
        raise RegionError(
            f"region {region} is not inside the image ({reader.height} x {reader.width} pixels): "
            "clip it to the image"
        )
    if len(mean) != reader.bands or len(std) != reader.bands:
        raise ConfigError(
            f"normalization has {len(mean)} means and {len(std)} stds but the image has "
            f"{reader.bands} bands: use the model's statistics for the same bands"
        )
    try:
        return Normalization(tuple(mean), tuple(std))
    except ValueError as err:  # its rule: finite values, std > 0
        raise ConfigError(
            f"normalization std must be finite and > 0, got mean={mean} std={std}"
        ) from err


def _peak_rss() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ----------------------------------------------------------------------------- engine
def _run_params(
    options: InferenceOptions,
    model_hash: str,
    mean: Sequence[float],
    std: Sequence[float],
    layout: TileLayout,
    origin: tuple[int, int],
) -> dict[str, Any]:
    opts = asdict(options)
    for runtime in ("batch_size", "device", "prefetch", "read_workers", "strip_width", "amp"):
        opts.pop(runtime)  # how it runs, not what it computes (amp does change results a little)
    return {
        "options": opts,
        "amp": options.amp,
        "model": model_hash,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "window": layout.size,
        "origin": list(origin),
    }


def _prepare_arrays(
    store: SceneStore, options: InferenceOptions, num_classes: int
) -> np.dtype[Any]:
    if options.label_nodata < num_classes and options.output != "probabilities":
        raise ConfigError(
            f"label_nodata {options.label_nodata} is a class id of this {num_classes}-class "
            f"model: use a value >= {num_classes}, e.g. {255 if num_classes <= 255 else 65535}"
        )
    label_dtype = np.dtype(
        np.uint8 if num_classes <= 255 and options.label_nodata <= 255 else np.uint16
    )
    want: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    if options.output in ("labels", "both"):
        want[LABELS] = ((store.height, store.width), label_dtype)
    if options.output in ("probabilities", "both"):
        want[PROBABILITIES] = (
            (num_classes, store.height, store.width),
            np.dtype(options.probability_dtype),
        )
    for name, (shape, dtype) in want.items():
        if name in store.group:
            arr = store.array(name)
            if arr.shape == shape and arr.dtype == dtype:
                continue
        if name == LABELS:
            store.create_array(name, dtype=dtype, fill_value=options.label_nodata, overwrite=True)
        else:
            store.create_array(name, dtype=dtype, fill_value=0, bands=num_classes, overwrite=True)
    return label_dtype


def predict_region(
    reader: WindowReader,
    model: torch.nn.Module,
    region: Window,
    out: SceneStore | str | Path,
    *,
    options: InferenceOptions,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[int, int], None] | None = None,
    runner: UnitRunner | None = None,
) -> InferenceReport:
    """Predict ``region`` of ``reader``'s image into a prediction store, streaming.

    Parameters
    ----------
    reader
        The image (any :class:`WindowReader`: a source, :class:`StoreReader`, :class:`ArrayReader`).
    model
        Maps normalized ``(batch, bands, S, S)`` float32 to ``(batch, classes, S, S)`` logits.
        It is put in ``eval()`` mode and moved to the device.
    region
        Pixels to predict, in image coordinates. In a scene store it is widened to whole write
        units (real pixels, predicted like the rest).
    out
        The image's own scene store (arrays written on its grid), a standalone store from
        :func:`open_prediction_store`, or a path (a standalone store with default chunking and
        no georeference). A standalone store is moved from ``NAME.partial`` to ``NAME`` when
        finished: use ``report.store_path`` afterwards.
    options, mean, std
        :class:`InferenceOptions`; per-band normalization (the model's own statistics).
    progress
        Called as ``progress(units_done, units_total)`` after each unit.
    runner
        Computes and writes the pending units (default: here, streaming); a Dask cluster's
        runner (:mod:`segflow.infer.cluster`) sends them to its workers instead. It gets
        ``(target, run, options, forward, normalize, counts)`` after the arrays exist.

    Returns
    -------
    InferenceReport
    """
    t_start = time.perf_counter()
    normalization = _check_inputs(reader, region, mean, std)
    device, amp_dtype, amp_name = resolve_device(options)
    target = _open_target(reader, region, out, options)
    model.eval()
    params = _run_params(options, _model_hash(model), mean, std, target.layout, target.origin)
    run = _start_run(target, options, params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    # class ids straight from the logits when nothing needs probabilities
    forward = _Forward(model, device, amp_dtype, _flips(options), labels_only=options.labels_only)
    normalize = _Normalizer(reader, normalization)
    counts = _Counts(len(target.units) - len(run.pending), len(target.units), progress)
    if run.pending:
        label_dtype = _ensure_arrays(target, run, options, forward, normalize)
        (runner or _infer_units)(target, run, options, forward, normalize, counts, label_dtype)
    store_path = _finish_run(target, run, options, region)
    rep = InferenceReport(
        store_path=str(store_path), tiles=counts.tiles, units=counts.units,
        pixels=counts.pixels, skipped_units=len(target.units) - len(run.pending),
        empty_units=counts.empty, num_classes=run.num_classes,
        seconds=time.perf_counter() - t_start,
        seconds_in_model=forward.seconds + counts.seconds_in_model, device=str(device),
        amp=amp_name, peak_rss_bytes=_peak_rss(),
        peak_gpu_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        workers=counts.workers or None,
    )  # fmt: skip
    log.info(
        "predicted %d units (%d skipped, %d empty) with %d tiles in %.1f s (model %.1f s)",
        rep.units, rep.skipped_units, rep.empty_units, rep.tiles, rep.seconds,
        rep.seconds_in_model,
    )  # fmt: skip
    return rep


@dataclass(frozen=True)
class _Target:
    """Where a prediction goes: the store, the image pixel of its corner, the tile layout,
    and the store's write units that the region touches."""

    store: SceneStore
    origin: tuple[int, int]
    layout: TileLayout
    units: list[BlockIndex]

    @property
    def standalone(self) -> bool:
        return bool(self.store.meta.get(_META_KEY))


def _open_target(
    reader: WindowReader, region: Window, out: SceneStore | str | Path, options: InferenceOptions
) -> _Target:
    """The store ``out`` names (created only after the layout is checked) and its units."""
    if isinstance(out, SceneStore):
        store = out
        origin = _store_origin(store, reader)
        layout = build_layout(options, reader.height, reader.width, origin)
    else:  # validate everything before anything is created on disk
        origin = (region.row_off, region.col_off)
        layout = build_layout(options, reader.height, reader.width, origin)
        store = open_prediction_store(out, region)
    store_region = region.translate(-origin[0], -origin[1])
    if not Window(0, 0, store.height, store.width).contains(store_region):
        raise RegionError(
            f"region {region} is outside the prediction store's pixels "
            f"({store.height} x {store.width} from image pixel {origin}): use another output"
        )
    units = [idx for idx, _ in store.grid.blocks_touching(store_region)]
    return _Target(store, origin, layout, units)


@dataclass
class _Run:
    """A prediction run's record: its parameters, class count, progress and pending units."""

    params: dict[str, Any]
    num_classes: int | None
    names: list[str]
    marker: Any
    pending: list[BlockIndex]


def _start_run(target: _Target, options: InferenceOptions, params: dict[str, Any]) -> _Run:
    """The store's run for ``params``: its units done so far, or a fresh start (arrays and
    progress reset) when the store holds another model's or options' predictions."""
    store = target.store
    names = prediction_arrays(options)
    marker = store.progress(names[0])
    recorded = store.meta.get(_RUN_KEY) or {}
    num_classes: int | None = recorded.get("num_classes")
    if recorded.get("params") != params:
        if recorded:
            log.info("prediction parameters changed: recomputing %s from scratch", store.path)
        if target.standalone:  # no longer a finished prediction until this run ends
            unpublish_store(store.path)
        for name in (LABELS, PROBABILITIES):
            store.forget_array(name)
        marker.reset()
        num_classes = None
        store.update_meta(**{_RUN_KEY: {"params": params, "num_classes": None}})
    done = marker.done()
    return _Run(params, num_classes, names, marker, [u for u in target.units if u not in done])


class _Counts:
    """Units, pixels, tiles and empty units done; ``progress(done, total)`` after each unit."""

    def __init__(
        self, skipped: int, total: int, progress: Callable[[int, int], None] | None
    ) -> None:
        self.finished, self.total, self.progress = skipped, total, progress
        self.tiles = self.pixels = self.units = self.empty = 0
        self.seconds_in_model = 0.0  # workers' forward time (on a cluster)
        self.workers: dict[str, dict[str, float]] = {}

    def __call__(self, sizes: list[int]) -> None:
        for size in sizes:
            self.finished += 1
            self.pixels += size
            self.units += 1
            if self.progress is not None:
                self.progress(self.finished, self.total)


#: Computes and writes a run's pending units: ``(target, run, options, forward, normalize,
#: counts, label_dtype)``.
UnitRunner = Callable[..., None]


def _ensure_arrays(
    target: _Target, run: _Run, options: InferenceOptions, forward: _Forward,
    normalize: _Normalizer,
) -> np.dtype[Any]:
    """The prediction arrays, made on a fresh run's first unit (one probe forward fixes the
    class count, recorded with the run); returns the labels' dtype."""
    store = target.store
    if run.num_classes is None:
        first = store.grid.window(run.pending[0].row, run.pending[0].col).translate(*target.origin)
        run.num_classes = _probe_classes(target.layout, first, normalize, forward)
        store.update_meta(**{_RUN_KEY: {"params": run.params, "num_classes": run.num_classes}})
    return _prepare_arrays(store, options, run.num_classes)


def _infer_units(
    target: _Target,
    run: _Run,
    options: InferenceOptions,
    forward: _Forward,
    normalize: _Normalizer,
    counts: _Counts,
    label_dtype: np.dtype[Any],
) -> None:
    """Compute and write ``run.pending`` here: tiles streamed through the model, units
    finished by a writer thread."""
    assert run.num_classes is not None  # _ensure_arrays fixed it
    counts.tiles, counts.empty = write_units(
        target.store, target.layout, target.origin, run.pending, options, forward, normalize,
        marker=run.marker, standalone=target.standalone, num_classes=run.num_classes,
        label_dtype=label_dtype, report_done=counts,
    )  # fmt: skip


def write_units(
    store: SceneStore,
    layout: TileLayout,
    origin: tuple[int, int],
    units: list[BlockIndex],
    options: InferenceOptions,
    forward: _Forward,
    normalize: _Normalizer,
    *,
    marker: Any,
    standalone: bool,
    num_classes: int,
    label_dtype: np.dtype[Any],
    report_done: Callable[[list[int]], None],
) -> tuple[int, int]:
    """Stream the tiles ``units`` need through the model; a writer thread finishes, writes and
    records each unit (``report_done`` gets their pixel counts). Returns (tiles, empty units).
    A local run and a cluster's worker both write their units here."""
    writer = _UnitWriter(store, options, marker, standalone)
    writer.label_dtype = label_dtype
    try:
        tiles_empty = _stream(layout, store.grid, origin, units, options, forward, normalize,
                              writer, num_classes, report_done)  # fmt: skip
        report_done(writer.collect(block=True))
    finally:
        writer.close()
    report_done(writer.collect(block=True))
    return tiles_empty


def _finish_run(
    target: _Target, run: _Run, options: InferenceOptions, region: Window
) -> Path | str:
    """Record a complete prediction (its arrays' parameters, consolidated metadata) and move
    a standalone store from ``NAME.partial`` to ``NAME``; returns the store's path."""
    store = target.store
    if run.marker.done() >= set(target.units):
        for name in run.names:
            store.record_array(name, **run.params, num_classes=run.num_classes,
                               region=asdict(region))  # fmt: skip
        if target.standalone:
            store.record_array("valid", region=asdict(region))
        store.consolidate()
        if target.standalone and isinstance(store.path, str):  # object storage: its marker
            publish_store(store.path, store.path)
        partial = isinstance(store.path, Path) and store.path.name.endswith(".partial")
        if target.standalone and isinstance(store.path, Path) and partial:
            final = store.path.with_name(store.path.name[: -len(".partial")])
            os.replace(store.path, final)
            return final
    return store.path


def predict_array(
    reader: WindowReader,
    model: torch.nn.Module,
    region: Window,
    *,
    options: InferenceOptions,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Class probabilities of a *small* ``region`` as one in-memory float32 array.

    :func:`predict_units` into one ``(classes, region.height, region.width)`` array, so memory
    grows with the region: use :func:`predict_region` for large ones.
    """
    parts: list[tuple[Window, np.ndarray]] = []
    predict_units(
        reader, model, region, options=options, mean=mean, std=std,
        sink=lambda w, p: parts.append((w.translate(-region.row_off, -region.col_off), p)),
    )  # fmt: skip
    out = np.zeros((parts[0][1].shape[0], region.height, region.width), np.float32)
    for w, p in parts:
        out[(slice(None), *w.slices)] = p
    return out


def predict_units(
    reader: WindowReader,
    model: torch.nn.Module,
    region: Window,
    *,
    options: InferenceOptions,
    mean: Sequence[float],
    std: Sequence[float],
    sink: Callable[[Window, np.ndarray], None],
    labels: bool = False,
) -> int:
    """Predict ``region`` and hand it to ``sink`` unit by unit, in bounded memory.

    The same tiling, mirroring, batching and merging as :func:`predict_region` (tiles anchored
    at the region's corner, like a standalone prediction store; units of ``options.tile``),
    without quantization, ``valid`` masking or a store: for validation during training,
    checks and quick looks. ``sink(window, output)`` gets each unit's window in image pixels
    and its float32 ``(classes, y, x)`` probabilities, or with ``labels`` (``crop`` mode
    without TTA: the argmax of the logits) its ``(y, x)`` class ids. Returns the tiles run.
    """
    normalization = _check_inputs(reader, region, mean, std)
    device, amp_dtype, _ = resolve_device(options)
    origin = (region.row_off, region.col_off)
    layout = build_layout(options, reader.height, reader.width, origin)
    if labels and not options.labels_only:
        raise ConfigError("labels straight from the logits need crop mode without TTA")
    model.eval()
    model.to(device)
    forward = _Forward(model, device, amp_dtype, _flips(options), labels_only=labels)
    normalize = _Normalizer(reader, normalization, skip_empty=False)
    grid = BlockGrid(region.height, region.width, options.tile)
    num_classes = _probe_classes(layout, region, normalize, forward)
    tiles, _ = _stream(
        layout,
        grid,
        origin,
        [idx for idx, _ in grid],
        options,
        forward,
        normalize,
        _CallbackSink(grid, origin, sink, labels=labels),
        num_classes,
        lambda sizes: None,
    )
    return tiles
