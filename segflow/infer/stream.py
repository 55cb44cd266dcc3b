"""Streaming tiles through the model: reader threads read and normalize windows ahead, the
calling thread batches them through the model, and the merger finishes each unit when its last
tile has arrived (see :mod:`segflow.infer.engine` for the whole picture)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np

from segflow.geometry import BlockGrid, BlockIndex, Window
from segflow.infer.forward import _Forward
from segflow.infer.merger import _CallbackSink, _Merged, _UnitWriter
from segflow.infer.options import InferenceOptions
from segflow.infer.readers import _Normalizer
from segflow.tiling import Step, TileLayout, schedule, strips

__all__ = ["reader_band"]


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
    writer: _UnitWriter | _CallbackSink,
    num_classes: int,
    report_done: Callable[[list[int]], None],
) -> tuple[int, int]:
    """Run every tile the pending units need; returns (tiles computed, empty units).

    A tile whose core has no valid pixel is not run (when ``normalize`` skips empty tiles); a
    unit that only such tiles cover is finished as nodata.
    """
    merging = _Merging(layout, grid, origin, pending, options, writer, num_classes)
    tiles = 0
    max_inflight = options.batch_size * (options.prefetch + 1)
    source = merging.steps()
    inflight: deque[tuple[Step, Future[tuple[np.ndarray | None, np.ndarray]]]] = deque()
    band = reader_band(options.strip_width, options.read_workers, grid.block)
    with ExitStack() as stack:
        pools = [
            stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix=f"segflow-read{i}"))
            for i in range(options.read_workers)
        ]

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

        try:
            fill()
            while inflight:
                tiles += _next_batch(inflight, fill, merging, forward, options.batch_size)
                # keep a few finished units queued for the writer, no more (bounded memory)
                report_done(writer.collect(block=True, keep=4))
        finally:
            for _, fut in inflight:
                fut.cancel()
    report_done(writer.collect(block=True))
    if merging.remaining:  # pragma: no cover - a scheduling bug, never user input
        raise RuntimeError(f"units left unfinished: {sorted(merging.remaining)[:5]}")
    return tiles, merging.empty


def _next_batch(
    inflight: deque[tuple[Step, Future[tuple[np.ndarray | None, np.ndarray]]]],
    fill: Callable[[], None],
    merging: _Merging,
    forward: _Forward,
    batch_size: int,
) -> int:
    """Take up to ``batch_size`` read tiles, run them through the model, merge the outputs
    (tiles without a valid pixel are merged as not run); returns the tiles run."""
    batch: list[tuple[Step, np.ndarray]] = []
    arrays: list[np.ndarray] = []
    while inflight and len(batch) < batch_size:
        step, fut = inflight.popleft()
        x, core_valid = fut.result()
        if x is None:  # no valid pixel in the tile's core: nothing to compute
            merging.add(step, None, core_valid)
        else:
            batch.append((step, core_valid))
            arrays.append(x)
        fill()
    if batch:
        probs = forward(np.stack(arrays))
        for (step, core_valid), p in zip(batch, probs, strict=True):
            merging.add(step, p, core_valid)
    return len(batch)


class _Merging:
    """The open units of a stream: tiles' outputs merged into them, each unit finished
    (handed to the writer) when its last tile has arrived."""

    def __init__(
        self,
        layout: TileLayout,
        grid: BlockGrid,
        origin: tuple[int, int],
        pending: list[BlockIndex],
        options: InferenceOptions,
        writer: _UnitWriter | _CallbackSink,
        num_classes: int,
    ) -> None:
        self.layout, self.grid, self.origin = layout, grid, origin
        self.writer, self.num_classes = writer, num_classes
        self.per_strip = max(1, options.strip_width // grid.block)
        self.by_col: dict[int, list[BlockIndex]] = {}
        for u in pending:
            self.by_col.setdefault(u.col, []).append(u)
        self.remaining: dict[BlockIndex, int] = {}
        self.open_units: dict[BlockIndex, _Merged] = {}
        self.empty = 0

    def unit_window(self, u: BlockIndex) -> Window:
        return self.grid.window(u.row, u.col).translate(*self.origin)

    def steps(self) -> Iterator[Step]:
        """The tiles strip by strip; each strip's units learn how many tiles they wait for."""
        for cols in strips(self.by_col, self.per_strip):
            todo = [u for c in cols for u in self.by_col[c]]
            for u in todo:
                self.remaining[u] = self.layout.count_touching(self.unit_window(u))
            yield from schedule(self.layout, self.grid, todo, origin=self.origin)

    def add(self, step: Step, probs: np.ndarray | None, core_valid: np.ndarray) -> None:
        """Merge one tile's output (``None``: not run) into the units its core overlaps."""
        tile = step.tile
        for u in step.units:
            uw = self.unit_window(u)
            part = tile.core.intersection(uw)
            merged = self.open_units.get(u)
            if merged is None:
                merged = self.open_units[u] = _Merged(uw.shape)
            merged.add(
                part.relative_to(uw),
                None if probs is None else probs[(..., *part.relative_to(tile.window).slices)],
                core_valid[part.relative_to(tile.core).slices],
                None if probs is None else self.layout.weights(tile, part),
            )
            self.remaining[u] -= 1
            if self.remaining[u] == 0:
                del self.remaining[u]
                merged = self.open_units.pop(u)
                self.empty += merged.empty
                self.writer.finish(u, merged, self.num_classes)
