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

import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from segflow.config import ClassDef
from segflow.errors import ConfigError, RegionError, StoreError
from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.io.store import GeoRef, SceneStore, SlideInfo, SourceRecord, staging_path
from segflow.stats import valid_and_finite
from segflow.tiling import (
    MirrorPlan,
    Step,
    Tile,
    TileLayout,
    crop_layout,
    gaussian_layout,
    mirror_plan,
    round_up,
    schedule,
    strips,
)

__all__ = [
    "ArrayReader",
    "InferenceOptions",
    "InferenceReport",
    "StoreReader",
    "WindowReader",
    "build_layout",
    "open_prediction_store",
    "predict_array",
    "predict_region",
    "prediction_unit",
    "resolve_device",
]

log = logging.getLogger(__name__)

PROBABILITIES = "prediction/probabilities"
LABELS = "prediction/labels"
_META_KEY = "prediction_store"  # set on standalone prediction stores (source window)
_RUN_KEY = "prediction_run"  # parameters of the prediction being written


# ----------------------------------------------------------------------------- readers
@runtime_checkable
class WindowReader(Protocol):
    """What the engine needs from an image: its size and window reads inside it.

    ``read_with_valid`` returns the ``(bands, height, width)`` pixels of a window that lies
    inside the image and its ``(height, width)`` boolean footprint, read together so a source
    whose mask comes from its nodata value decodes the window once. It is called from several
    threads at once.
    """

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def bands(self) -> int: ...

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]: ...


class ArrayReader:
    """A :class:`WindowReader` over an in-memory ``(band, y, x)`` array (tests, small images)."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        if image.ndim != 3:
            raise ConfigError(f"image must be (band, y, x), got shape {image.shape}")
        if valid is not None and valid.shape != image.shape[1:]:
            raise ConfigError(f"valid shape {valid.shape} does not match image {image.shape}")
        self.image = image
        self.valid = valid

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    @property
    def bands(self) -> int:
        return int(self.image.shape[0])

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.image[(slice(None), *window.slices)]
        if self.valid is None:
            return pixels, np.ones(window.shape, dtype=bool)
        return pixels, self.valid[window.slices]


class StoreReader:
    """A :class:`WindowReader` over a scene store's ``image`` and ``valid`` arrays."""

    def __init__(self, store: SceneStore) -> None:
        self.store = store
        self._image = store.array("image")
        self._valid = store.array("valid")
        if self._image.ndim != 3 or self._image.shape[0] == 0:
            raise StoreError(f"store {str(store.path)!r} has no image bands to predict from")

    @property
    def height(self) -> int:
        return int(self._image.shape[1])

    @property
    def width(self) -> int:
        return int(self._image.shape[2])

    @property
    def bands(self) -> int:
        return int(self._image.shape[0])

    def read_with_valid(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(self._image[(slice(None), *window.slices)])
        return pixels, np.asarray(self._valid[window.slices], dtype=bool)


# ----------------------------------------------------------------------------- options
# flipped dims of (batch, band, y, x) per TTA set; each set is a group (its own inverse)
_TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "flips": ((), (3,), (2,), (2, 3)),
    "horizontal": ((), (3,)),
    "rot180": ((), (2, 3)),
}


@dataclass(frozen=True, kw_only=True)
class InferenceOptions:
    """How :func:`predict_region` runs.

    Parameters
    ----------
    tile
        ``crop``: output tile side T (best a multiple of the store's write unit, or a divisor
        of it, so no tile straddles two units). ``gaussian``: sets the default window.
    halo
        Context on each side, at least the model's receptive-field radius (from the checkpoint).
    mode
        ``crop`` (each pixel from exactly one tile) or ``gaussian`` (weighted overlap).
    overlap
        ``gaussian`` only: window overlap fraction, stride ``int(window * (1 - overlap))``.
    window
        ``gaussian`` only: window side; default ``round_up(tile + 2*halo, size_multiple)``,
        the same model input as ``crop`` mode.
    size_multiple
        The model's input side must be a multiple of this (``2**depth`` for a U-Net).
    batch_size, device, amp
        Tiles per forward; ``None`` picks CUDA when available; ``auto`` is bf16 on CUDA
        devices that support it, else fp16, and off on CPU.
    tta_flips, tta_set
        Average the softmax over flipped copies of each window: ``flips`` identity,
        left-right, up-down and both (all four, for models trained with flips and quarter
        turns); ``horizontal`` identity and left-right (models trained with left-right flips
        only); ``rot180`` identity and both axes (quarter turns only).
    prefetch, read_workers
        Batches read ahead and reader threads.
    output, probability_dtype, label_nodata
        What is written, how probabilities are stored, the label of invalid pixels.
    strip_width
        Pixels per column strip of units (bounds memory; see the module notes).
    """

    tile: int = 512
    halo: int
    mode: Literal["crop", "gaussian"] = "crop"
    overlap: float = 0.5
    window: int | None = None
    size_multiple: int = 1
    batch_size: int = 8
    device: str | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    tta_flips: bool = False
    tta_set: Literal["flips", "horizontal", "rot180"] = "flips"
    prefetch: int = 2
    read_workers: int = 2
    output: Literal["probabilities", "labels", "both"] = "both"
    probability_dtype: Literal["uint8", "float16"] = "uint8"
    label_nodata: int = 255
    strip_width: int = 8192

    def __post_init__(self) -> None:
        if self.tile <= 0:
            raise ConfigError(f"tile must be > 0, got {self.tile}: use e.g. --tile 512")
        if self.halo < 0:
            raise ConfigError(f"halo must be >= 0, got {self.halo}: use the checkpoint's halo")
        if self.mode not in ("crop", "gaussian"):
            raise ConfigError(f"mode must be 'crop' or 'gaussian', got {self.mode!r}")
        if self.mode == "crop" and self.tile < 2 * self.halo:
            raise ConfigError(
                f"tile {self.tile} is smaller than twice the halo {self.halo}: most of each "
                f"window would be context; use --tile {round_up(2 * self.halo, 16)} or more"
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}: use e.g. 0.5")
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"window must be > 0, got {self.window}")
        if self.window is not None and self.mode == "crop":
            raise ConfigError(
                f"window={self.window} applies to mode 'gaussian' only; in 'crop' mode the "
                "model input is tile + 2 * halo: leave window unset"
            )
        for name in ("size_multiple", "batch_size", "prefetch", "read_workers", "strip_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tta_set not in _TTA_FLIPS:
            raise ConfigError(f"tta_set must be one of {sorted(_TTA_FLIPS)}, got {self.tta_set!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.output not in ("probabilities", "labels", "both"):
            raise ConfigError(f"output must be probabilities, labels or both, got {self.output!r}")
        if self.probability_dtype not in ("uint8", "float16"):
            raise ConfigError(
                f"probability_dtype must be uint8 or float16, got {self.probability_dtype!r}"
            )
        if not 0 <= self.label_nodata <= 65535:
            raise ConfigError(f"label_nodata must be in [0, 65535], got {self.label_nodata}")

    @property
    def window_size(self) -> int:
        """The model input side for this mode."""
        if self.mode == "gaussian" and self.window is not None:
            return self.window
        return round_up(self.tile + 2 * self.halo, self.size_multiple)

    @property
    def labels_only(self) -> bool:
        """Whether nothing needs probabilities: class ids only, no blending, no flips."""
        return self.output == "labels" and self.mode == "crop" and not self.tta_flips


@dataclass(frozen=True)
class InferenceReport:
    """What one :func:`predict_region` call did.

    ``tiles`` counts model input windows computed (a flip-TTA window counts once); ``pixels``
    the output pixels written; ``skipped_units`` the units already done (resumed);
    ``empty_units`` the units with no valid pixel, written as nodata without the model.
    ``seconds_in_model`` is the model's own forward time (CUDA-synchronized; softmax,
    argmax and the copy to the host are the engine's). ``peak_rss_bytes`` is
    the process's peak resident memory so far (not only this call); ``peak_gpu_bytes`` the
    CUDA allocator peak during the call.
    """

    store_path: str
    tiles: int
    units: int
    pixels: int
    skipped_units: int
    empty_units: int
    num_classes: int | None
    seconds: float
    seconds_in_model: float
    device: str
    amp: str
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None


# ----------------------------------------------------------------------------- stores
#: Largest memory one open unit's buffers may take in :func:`prediction_unit`.
UNIT_BUDGET_BYTES = 32 * 2**20


def prediction_unit(options: InferenceOptions, *, chunk: int, num_classes: int) -> int:
    """Side of a prediction store's write unit (its shard): ``chunk`` doubled up to 2048.

    Each unit costs one Zarr write per array and one progress mark, each a trip through
    Zarr's event loop, and with one 512-pixel chunk per unit those trips were most of the
    writer's CPU (labels and mask of 8192^2 pixels: 2.4-2.9 CPU s in 512-pixel units, 0.8-1.1
    in 2048-pixel shards; segment_region of 16384^2 with the demo's U-Net: 49.6 s -> 40 s).
    A larger unit holds more memory open (the accumulators of a few unit rows of a strip),
    so the side is the largest whose buffers fit :data:`UNIT_BUDGET_BYTES` (the valid mask,
    and class ids, or float32 class sums and weights when probabilities are blended or
    written) and that is at most two output tiles wide (a killed run loses little).
    """
    per_pixel = 1 + (4 if options.labels_only else 4 * max(num_classes, 2) + 4)
    cap = min(2048, 2 * max(options.tile, chunk))
    side = chunk
    while 2 * side <= cap and (2 * side) ** 2 * per_pixel <= UNIT_BUDGET_BYTES:
        side *= 2
    return side


def open_prediction_store(
    path: str | Path,
    region: Window,
    *,
    chunk: int = 512,
    shard: int | None = None,
    georef: GeoRef | None = None,
    slide: SlideInfo | None = None,
    source: SourceRecord | None = None,
    classes: Sequence[ClassDef] = (),
    ignore_index: int = 255,
) -> SceneStore:
    """A standalone prediction store for ``region`` of a source image (e.g. a GeoTIFF).

    A scene store whose pixel grid is the region (``georef`` is the *source's* georeference;
    the store gets the region's own geotransform), with no image bands, so exporters read it
    like any scene store. ``meta["prediction_store"]["source_window"]`` records where the
    region lies in the source. Returns the finished store at ``path`` if there is one,
    else the unfinished one at ``path.partial`` (resumed), else a new one there;
    :func:`predict_region` moves it to ``path`` once every unit is done.
    """
    p = Path(path)
    window = {
        "row_off": region.row_off,
        "col_off": region.col_off,
        "height": region.height,
        "width": region.width,
    }
    for candidate in (p, staging_path(p)):
        if (candidate / "zarr.json").is_file():
            store = SceneStore.open(candidate, mode="r+")
            got = store.meta.get(_META_KEY, {}).get("source_window")
            if got != window:
                raise StoreError(
                    f"{str(candidate)!r} holds predictions for source window {got}, not {window}: "
                    "remove it or choose another output path"
                )
            return store
    stage = staging_path(p)
    if stage.exists():
        shutil.rmtree(stage)  # a staging directory without metadata: nothing to resume
    store = SceneStore.create(
        stage,
        bands=(),
        height=region.height,
        width=region.width,
        dtype="uint8",
        chunk=chunk,
        shard=shard,
        georef=(
            GeoRef(georef.crs_wkt, georef.epsg, georef.window_geotransform(region))
            if georef
            else None
        ),
        slide=slide,
        source=source,
        classes=classes,
        ignore_index=ignore_index,
    )
    store.update_meta(**{_META_KEY: {"source_window": window}})
    return store


def _store_origin(store: SceneStore, reader: WindowReader) -> tuple[int, int]:
    """Image coordinates of the store's pixel (0, 0)."""
    rec = store.meta.get(_META_KEY)
    if rec:
        w = rec["source_window"]
        return int(w["row_off"]), int(w["col_off"])
    if (store.height, store.width) != (reader.height, reader.width):
        raise StoreError(
            f"store {str(store.path)!r} is {store.height} x {store.width} pixels but the image is "
            f"{reader.height} x {reader.width}: predict into the image's own scene store or a "
            "prediction store made by open_prediction_store()"
        )
    return 0, 0


# ----------------------------------------------------------------------------- helpers
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


def _model_hash(model: torch.nn.Module) -> str:
    """The model's identity for resume: its weights (values, shapes, dtypes, in order).

    Names are left out, so the same weights wrapped in another module still resume.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in model.state_dict().values():
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(options: InferenceOptions) -> tuple[torch.device, torch.dtype | None, str]:
    """The torch device, autocast dtype and AMP name ``options`` ask for (checked)."""
    name = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    amp = options.amp
    if amp == "auto":
        if device.type != "cuda":
            return device, None, "off"
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return device, None, "off"
    return device, (torch.bfloat16 if amp == "bf16" else torch.float16), amp


def _check_output(logits: Any, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[2:] != x.shape[2:]:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise ConfigError(
            f"model output must be (batch, classes, {x.shape[2]}, {x.shape[3]}) for input "
            f"{tuple(x.shape)}, got {shape}: check the model's size multiple and halo"
        )
    return logits


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``(batch, classes, y, x)`` logits (one channel: a sigmoid)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def _labels(logits: torch.Tensor) -> torch.Tensor:
    """The argmax class of ``(batch, classes, y, x)`` logits as ``(batch, y, x)``.

    The same class as the argmax of :func:`_probabilities` (softmax and sigmoid are
    monotonic; ties go to the lower class id), without computing them: uint8 for up to 256
    classes. A running maximum over the classes, in element-wise ops, rather than
    ``torch.argmax(dim=1)``, whose CPU kernel took 350 ms for a (4, 2, 1040, 1040) batch
    here (this: 3 ms; 2 classes need one comparison).
    """
    n = logits.shape[1]
    if n == 1:
        return (logits[:, 0] > 0).to(torch.uint8)
    dtype = torch.uint8 if n <= 256 else torch.int32
    best = logits[:, 0]
    out = (logits[:, 1] > best).to(dtype)  # strict: a tie keeps the lower id
    for k in range(2, n):
        best = torch.maximum(best, logits[:, k - 1])
        now = (logits[:, k] > best).to(dtype)
        out += now * (k - out)  # k where now, else unchanged (exact even where uint8 wraps)
    return out


def _flips(options: InferenceOptions) -> tuple[tuple[int, ...], ...]:
    return _TTA_FLIPS[options.tta_set] if options.tta_flips else ((),)


class _Forward:
    """Batches through the model: normalization already done, flips, AMP, timing.

    ``labels_only`` (no blending, no flips: nothing needs probabilities) returns each
    window's argmax class ``(batch, y, x)``; otherwise float32 ``(batch, classes, y, x)``
    probabilities. ``seconds`` times the model alone (CUDA-synchronized): the softmax or
    argmax and the copy to the host count as the engine's work, not the model's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        amp: torch.dtype | None,
        flips: tuple[tuple[int, ...], ...] = ((),),
        *,
        labels_only: bool = False,
    ) -> None:
        if labels_only and len(flips) > 1:
            raise ValueError("flip TTA averages probabilities: labels_only cannot use it")
        self.model = model
        self.device = device
        self.amp = amp
        self.flips = flips
        self.labels_only = labels_only
        self.seconds = 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        flips = self.flips
        if len(flips) > 1:
            x = torch.cat([x.flip(d) if d else x for d in flips])
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.amp)
            if self.amp is not None
            else nullcontext()
        )
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            with ctx:
                logits = _check_output(self.model(x), x)
            if cuda:
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - t0
            if self.labels_only:
                return np.asarray(_labels(logits).cpu().numpy())
            p = _probabilities(logits)
            if len(flips) > 1:  # flip each copy back and average
                n = batch.shape[0]
                mean = p[:n].clone()
                for k, d in enumerate(flips[1:], start=1):
                    mean += p[k * n : (k + 1) * n].flip(d)
                p = mean / len(flips)
        return np.asarray(p.cpu().numpy(), dtype=np.float32)


class _Normalizer:
    """Reads one tile: its model window (mirrored past the image) and its core's valid mask.

    Returns ``(x, core_valid)``: ``x`` the window as normalized float32, or ``None`` when
    ``skip_empty`` and no pixel of the core is valid (the tile then needs no model run);
    ``core_valid`` the boolean footprint of ``tile.core``, which always lies inside the image.
    Pixels and mask come from one read, so the writer never reads the image again.

    Invalid pixels are the reader's mask plus every pixel where a band is NaN or +/-inf.
    In ``x`` every invalid pixel holds 0, i.e. the normalization mean, whatever its raw value
    (a nodata value, a finite value under a mask, NaN, inf): NaN never reaches the model, and
    a pixel's neighbours are predicted the same however the pixel was marked nodata.
    """

    def __init__(
        self,
        reader: WindowReader,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        skip_empty: bool = True,
    ) -> None:
        self.reader = reader
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.inv_std = (1.0 / np.asarray(std, dtype=np.float32)).reshape(-1, 1, 1)
        self.skip_empty = skip_empty

    def __call__(self, tile: Tile) -> tuple[np.ndarray | None, np.ndarray]:
        plan = mirror_plan(tile.window, self.reader.height, self.reader.width)
        block, valid = self._read(plan)
        core_valid = valid[tile.core.relative_to(plan.source).slices]
        if self.skip_empty and not core_valid.any():
            return None, core_valid
        return self._scale(plan, block, valid), core_valid

    def window(self, tile: Tile) -> np.ndarray:
        """The tile's normalized model window, whatever its valid pixels."""
        plan = mirror_plan(tile.window, self.reader.height, self.reader.width)
        return self._scale(plan, *self._read(plan))

    def _read(self, plan: MirrorPlan) -> tuple[np.ndarray, np.ndarray]:
        """The pixels of ``plan.source`` and their valid mask, non-finite pixels invalid.

        Sources already apply the non-finite rule; this covers every other reader (scene
        stores ingested before the rule, in-memory arrays).
        """
        block, valid = self.reader.read_with_valid(plan.source)
        block = np.asarray(block)
        return block, valid_and_finite(block, valid)

    def _scale(self, plan: MirrorPlan, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        x = plan.take(block).astype(np.float32)
        x -= self.mean
        x *= self.inv_std
        if not valid.all():
            # One defined fill for every invalid pixel: 0, the normalization mean. Raw nodata
            # values (e.g. -9999), finite values under a mask, NaN and inf all look alike to
            # the model, so NaN never reaches it and a NaN pixel's neighbours are predicted
            # exactly as when the same pixel is nodata by value or by mask.
            x[:, ~plan.take(valid)] = 0.0
        return x


def _probe_classes(
    layout: TileLayout, window: Window, normalize: _Normalizer, forward: _Forward
) -> int:
    """The model's class count, from one forward of the first tile of ``window`` (not timed)."""
    probe = torch.from_numpy(normalize.window(next(iter(layout.touching(window))))[None])
    with torch.inference_mode():
        logits = _check_output(forward.model(probe.to(forward.device)), probe)
    return max(2, int(logits.shape[1]))  # one channel: sigmoid, background and foreground


def _check_inputs(
    reader: WindowReader, region: Window, mean: Sequence[float], std: Sequence[float]
) -> None:
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
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
        raise ConfigError(f"normalization std must be finite and > 0, got mean={mean} std={std}")


def _peak_rss() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ----------------------------------------------------------------------------- writer
class _Merged:
    """One write unit being merged from the tiles whose core overlaps it.

    Tiles without blending weights (``crop`` layouts: every pixel from exactly one tile) are
    copied in (no sum, no division: the result is the tile's own output bit for bit), be it
    ``(classes, y, x)`` probabilities or, from a labels-only forward, ``(y, x)`` class ids;
    weighted tiles (``gaussian``) add ``probabilities * weights`` and the weights. ``valid``
    gathers the tiles' core masks, so the unit's footprint is never read again. A unit that
    received no model output (every tile over it had no valid pixel) is ``empty``.
    """

    __slots__ = ("acc", "shape", "valid", "wsum")

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.acc: np.ndarray | None = None
        self.wsum: np.ndarray | None = None
        self.valid = np.zeros(shape, dtype=bool)

    @property
    def empty(self) -> bool:
        return self.acc is None

    def add(
        self,
        dst: Window,
        out: np.ndarray | None,
        valid: np.ndarray,
        weights: np.ndarray | None,
    ) -> None:
        """Add one tile's ``out`` (or ``None``: not run) and ``valid`` over ``dst``."""
        self.valid[dst.slices] |= valid
        if out is None:
            return
        if self.acc is None:
            lead = out.shape[:-2]  # (classes,) for probabilities, () for class ids
            self.acc = np.zeros((*lead, *self.shape), out.dtype if weights is None else np.float32)
        region = (..., *dst.slices)
        if weights is None:  # crop: the only tile over these pixels, weight 1
            self.acc[region] = out
            return
        if self.wsum is None:
            self.wsum = np.zeros(self.shape, np.float32)
        self.acc[region] += out * weights
        self.wsum[dst.slices] += weights

    def labels(self, dtype: np.dtype[Any]) -> np.ndarray:
        """The unit's class ids (the argmax of its probabilities; zeros where no tile ran)."""
        if self.acc is None:
            return np.zeros(self.shape, dtype)
        if self.acc.ndim == 2:
            return self.acc.astype(dtype, copy=False)
        probs = torch.from_numpy(self.probabilities(self.acc.shape[0]))[None]
        return _labels(probs)[0].numpy().astype(dtype, copy=False)

    def probabilities(self, num_classes: int) -> np.ndarray:
        """The merged ``(classes, y, x)`` probabilities (zeros where no tile ran)."""
        if self.acc is None:
            return np.zeros((num_classes, *self.shape), np.float32)
        if self.acc.ndim == 2:
            raise ValueError("a labels-only merge has no probabilities")
        if self.wsum is None:
            return self.acc
        return self.acc / np.maximum(self.wsum, np.finfo(np.float32).tiny)


class _UnitWriter:
    """Finishes units (divide, argmax, quantize, write, mark) on one background thread."""

    def __init__(
        self,
        store: SceneStore,
        options: InferenceOptions,
        marker: Any,
        write_valid: bool,
    ) -> None:
        self.store = store
        self.options = options
        self.marker = marker
        self.write_valid = write_valid
        self.label_dtype: np.dtype[Any] = np.dtype(np.uint8)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segflow-write")
        self.pending: deque[tuple[BlockIndex, Future[int]]] = deque()

    def finish(self, unit: BlockIndex, merged: _Merged, num_classes: int) -> None:
        self.pending.append((unit, self.pool.submit(self._finish, unit, merged, num_classes)))

    def _finish(self, unit: BlockIndex, merged: _Merged, num_classes: int) -> int:
        out_window = self.store.grid.window(unit.row, unit.col)
        valid = merged.valid
        opts = self.options
        if opts.output in ("labels", "both"):
            labels = merged.labels(self.label_dtype)
            labels[~valid] = opts.label_nodata
            self.store.write_window(LABELS, out_window, labels)
        if opts.output in ("probabilities", "both"):
            probs = merged.probabilities(num_classes)
            probs[:, ~valid] = 0
            if opts.probability_dtype == "uint8":
                q = np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
            else:
                q = probs.astype(np.float16)
            self.store.write_window(PROBABILITIES, out_window, q)
        if self.write_valid:
            self.store.write_window("valid", out_window, valid)
        self.marker.mark(unit)
        return out_window.size

    def collect(self, block: bool = False, keep: int = 0) -> list[int]:
        """Sizes of finished units; waits while more than ``keep`` are pending if ``block``."""
        done = []
        while self.pending and (self.pending[0][1].done() or (block and len(self.pending) > keep)):
            done.append(self.pending.popleft()[1].result())
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _ArraySink:
    """Finishes units into an in-memory ``(class, y, x)`` float32 array (:func:`predict_array`)."""

    def __init__(self, out: np.ndarray, grid: BlockGrid) -> None:
        self.out = out
        self.grid = grid
        self.done: list[int] = []

    def finish(self, unit: BlockIndex, merged: _Merged, num_classes: int) -> None:
        w = self.grid.window(unit.row, unit.col)
        self.out[(slice(None), *w.slices)] = merged.probabilities(num_classes)
        self.done.append(w.size)

    def collect(self, block: bool = False, keep: int = 0) -> list[int]:
        done, self.done = self.done, []
        return done


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

    Returns
    -------
    InferenceReport
    """
    t_start = time.perf_counter()
    _check_inputs(reader, region, mean, std)
    device, amp_dtype, amp_name = resolve_device(options)
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
    grid: BlockGrid = store.grid
    units = [idx for idx, _ in grid.blocks_touching(store_region)]
    model.eval()
    params = _run_params(options, _model_hash(model), mean, std, layout, origin)

    names = [
        n
        for n, kind in ((LABELS, "labels"), (PROBABILITIES, "probabilities"))
        if options.output in (kind, "both")
    ]
    marker = store.progress(names[0])
    run = store.meta.get(_RUN_KEY) or {}
    num_classes: int | None = run.get("num_classes")
    if run.get("params") != params:
        if run:
            log.info("prediction parameters changed: recomputing %s from scratch", store.path)
        for name in (LABELS, PROBABILITIES):
            store.forget_array(name)
        marker.reset()
        num_classes = None
        store.update_meta(**{_RUN_KEY: {"params": params, "num_classes": None}})
    done = marker.done()
    pending = [u for u in units if u not in done]
    skipped = len(units) - len(pending)
    standalone = bool(store.meta.get(_META_KEY))

    peak_gpu: int | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    # class ids straight from the logits when nothing needs probabilities
    forward = _Forward(model, device, amp_dtype, _flips(options), labels_only=options.labels_only)
    normalize = _Normalizer(reader, mean, std)
    writer = _UnitWriter(store, options, marker, standalone)
    counts = {"tiles": 0, "pixels": 0, "units": 0, "empty": 0}
    total = len(units)
    finished = skipped

    def report_done(sizes: list[int]) -> None:
        nonlocal finished
        for size in sizes:
            finished += 1
            counts["pixels"] += size
            counts["units"] += 1
            if progress is not None:
                progress(finished, total)

    try:
        if pending:
            if num_classes is None:
                # a fresh run: one probe forward fixes the class count before arrays are made
                first = grid.window(pending[0].row, pending[0].col).translate(*origin)
                num_classes = _probe_classes(layout, first, normalize, forward)
                store.update_meta(**{_RUN_KEY: {"params": params, "num_classes": num_classes}})
            writer.label_dtype = _prepare_arrays(store, options, num_classes)
            counts["tiles"], counts["empty"] = _stream(
                layout,
                grid,
                origin,
                pending,
                options,
                forward,
                normalize,
                writer,
                num_classes,
                report_done,
            )
        report_done(writer.collect(block=True))
    finally:
        writer.close()
    report_done(writer.collect(block=True))

    complete = marker.done() >= set(units)
    if complete:
        for name in names:
            store.record_array(name, **params, num_classes=num_classes, region=asdict(region))
        if standalone:
            store.record_array("valid", region=asdict(region))
        store.consolidate()
    store_path = store.path
    if standalone and complete and store_path.name.endswith(".partial"):
        final = store_path.with_name(store_path.name[: -len(".partial")])
        os.replace(store_path, final)
        store_path = final
    if device.type == "cuda":
        peak_gpu = int(torch.cuda.max_memory_allocated(device))
    rep = InferenceReport(
        store_path=str(store_path),
        tiles=counts["tiles"],
        units=counts["units"],
        pixels=counts["pixels"],
        skipped_units=skipped,
        empty_units=counts["empty"],
        num_classes=num_classes,
        seconds=time.perf_counter() - t_start,
        seconds_in_model=forward.seconds,
        device=str(device),
        amp=amp_name,
        peak_rss_bytes=_peak_rss(),
        peak_gpu_bytes=peak_gpu,
    )
    log.info(
        "predicted %d units (%d skipped, %d empty) with %d tiles in %.1f s (model %.1f s)",
        rep.units,
        rep.skipped_units,
        rep.empty_units,
        rep.tiles,
        rep.seconds,
        rep.seconds_in_model,
    )
    return rep


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

    The same tiling, mirroring, batching and merging as :func:`predict_region` (tiles anchored
    at the region's corner, like a standalone prediction store), without quantization, ``valid``
    masking or a store: for checks, validation during training and quick looks. The result is
    ``(classes, region.height, region.width)``, so memory grows with the region: use
    :func:`predict_region` for large ones.
    """
    _check_inputs(reader, region, mean, std)
    device, amp_dtype, _ = resolve_device(options)
    origin = (region.row_off, region.col_off)
    layout = build_layout(options, reader.height, reader.width, origin)
    model.eval()
    model.to(device)
    forward = _Forward(model, device, amp_dtype, _flips(options))
    normalize = _Normalizer(reader, mean, std, skip_empty=False)
    grid = BlockGrid(region.height, region.width, options.tile)
    num_classes = _probe_classes(layout, region, normalize, forward)
    out = np.zeros((num_classes, region.height, region.width), np.float32)
    _stream(
        layout,
        grid,
        origin,
        [idx for idx, _ in grid],
        options,
        forward,
        normalize,
        _ArraySink(out, grid),
        num_classes,
        lambda sizes: None,
    )
    return out


def reader_band(strip_width: int, workers: int, unit: int) -> int:
    """Width (pixels) of the column bands that each reader thread takes in turn.

    Source handles are per thread (GDAL's are not thread-safe) and so are their block
    caches: a source tile that two neighbouring windows share is decoded once if one thread
    reads both, twice otherwise (on a 512-tiled DEFLATE GeoTIFF with 1040-pixel windows,
    two thirds of the CPU time of handing each window to whichever thread is free:
    ``benchmarks/bench_source_reads.py``). Bands of whole units split each strip evenly
    between the readers.

    Examples
    --------
    >>> reader_band(8192, 2, 1024), reader_band(8192, 3, 1024), reader_band(1024, 4, 1024)
    (4096, 3072, 1024)
    """
    units = max(1, strip_width // unit)
    return unit * max(1, -(-units // max(1, workers)))


def _stream(
    layout: TileLayout,
    grid: BlockGrid,
    origin: tuple[int, int],
    pending: list[BlockIndex],
    options: InferenceOptions,
    forward: _Forward,
    normalize: _Normalizer,
    writer: _UnitWriter | _ArraySink,
    num_classes: int,
    report_done: Callable[[list[int]], None],
) -> tuple[int, int]:
    """Run every tile the pending units need; returns (tiles computed, empty units).

    A tile whose core has no valid pixel is not run (when ``normalize`` skips empty tiles); a
    unit that only such tiles cover is finished as nodata.
    """
    unit_size = grid.block
    per_strip = max(1, options.strip_width // unit_size)
    by_col: dict[int, list[BlockIndex]] = {}
    for u in pending:
        by_col.setdefault(u.col, []).append(u)
    remaining: dict[BlockIndex, int] = {}
    open_units: dict[BlockIndex, _Merged] = {}
    empty = 0

    def unit_window(u: BlockIndex) -> Window:
        return grid.window(u.row, u.col).translate(*origin)

    def steps() -> Any:
        for cols in strips(by_col, per_strip):
            todo = [u for c in cols for u in by_col[c]]
            for u in todo:
                remaining[u] = layout.count_touching(unit_window(u))
            yield from schedule(layout, grid, todo, origin=origin)

    def add(step: Step, probs: np.ndarray | None, core_valid: np.ndarray) -> None:
        nonlocal empty
        tile = step.tile
        for u in step.units:
            uw = unit_window(u)
            part = tile.core.intersection(uw)
            merged = open_units.get(u)
            if merged is None:
                merged = open_units[u] = _Merged(uw.shape)
            merged.add(
                part.relative_to(uw),
                None if probs is None else probs[(..., *part.relative_to(tile.window).slices)],
                core_valid[part.relative_to(tile.core).slices],
                None if probs is None else layout.weights(tile, part),
            )
            remaining[u] -= 1
            if remaining[u] == 0:
                del remaining[u]
                merged = open_units.pop(u)
                empty += merged.empty
                writer.finish(u, merged, num_classes)

    tiles = 0
    max_inflight = options.batch_size * (options.prefetch + 1)
    source = iter(steps())
    inflight: deque[tuple[Step, Future[tuple[np.ndarray | None, np.ndarray]]]] = deque()
    band = reader_band(options.strip_width, options.read_workers, unit_size)
    with ExitStack() as stack:
        pools = [
            stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix=f"segflow-read{i}"))
            for i in range(options.read_workers)
        ]
        try:

            def fill() -> None:
                while len(inflight) < max_inflight:
                    step = next(source, None)
                    if step is None:
                        return
                    # a reader per column band: each keeps its own source handle, whose
                    # block cache then serves the tiles its neighbouring windows share
                    col = (step.tile.core.col_off - origin[1]) // band
                    pool = pools[col % len(pools)]
                    inflight.append((step, pool.submit(normalize, step.tile)))

            fill()
            while inflight:
                batch: list[tuple[Step, np.ndarray]] = []
                arrays: list[np.ndarray] = []
                while inflight and len(batch) < options.batch_size:
                    step, fut = inflight.popleft()
                    x, core_valid = fut.result()
                    if x is None:  # no valid pixel in the tile's core: nothing to compute
                        add(step, None, core_valid)
                    else:
                        batch.append((step, core_valid))
                        arrays.append(x)
                    fill()
                if batch:
                    probs = forward(np.stack(arrays))
                    tiles += len(batch)
                    for (step, core_valid), p in zip(batch, probs, strict=True):
                        add(step, p, core_valid)
                # keep a few finished units queued for the writer, no more (bounded memory)
                report_done(writer.collect(block=True, keep=4))
        finally:
            for _, fut in inflight:
                fut.cancel()
    report_done(writer.collect(block=True))
    if remaining:  # pragma: no cover - a scheduling bug, never user input
        raise RuntimeError(f"units left unfinished: {sorted(remaining)[:5]}")
    return tiles, empty
