"""The merger: tiles' outputs into write units (crop copy or Gaussian-weighted sum), each unit
finished (divided, quantized, written, marked done) once its last tile has arrived.

The layout (:mod:`segflow.tiling`) yields coordinates; the merger owns the storage, as
MONAI's ``Merger`` does.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.infer.forward import _labels
from segflow.infer.options import InferenceOptions
from segflow.infer.store import LABELS, PROBABILITIES
from segflow.io.store import SceneStore


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


class _CallbackSink:
    """Hands each finished unit to ``fn(window, output)`` (:func:`predict_units`): ``window``
    in image pixels, ``output`` the unit's ``(class, y, x)`` float32 probabilities or, with
    ``labels``, its ``(y, x)`` class ids."""

    def __init__(
        self, grid: BlockGrid, origin: tuple[int, int], fn: Any, *, labels: bool = False
    ) -> None:
        self.grid = grid
        self.origin = origin
        self.fn = fn
        self.labels = labels
        self.done: list[int] = []

    def finish(self, unit: BlockIndex, merged: _Merged, num_classes: int) -> None:
        w = self.grid.window(unit.row, unit.col)
        out = merged.labels(np.dtype(np.int64)) if self.labels else merged.probabilities(num_classes)
        self.fn(w.translate(*self.origin), out)
        self.done.append(w.size)

    def collect(self, block: bool = False, keep: int = 0) -> list[int]:
        done, self.done = self.done, []
        return done
