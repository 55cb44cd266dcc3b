"""Reading the model windows of a tiled GeoTIFF: any free reader thread vs column bands.

    python benchmarks/bench_source_reads.py [--size 32768] [--tile 1024] [--halo 8]
        [--workers 2] [--workdir bench-data]

segment_region's readers each hold their own GDAL handle (GDAL handles are not thread-safe),
and with it their own block cache. The windows (tile + halo on each side) of neighbouring
tiles share source tiles (a 1040-pixel window of a 512-tiled source touches 4 x 4 of them),
so a source tile is decoded once per reader that reads a window over it. This reads every
window of the mosaic of ``make_big_geotiff.py`` in the engine's order (column strips of
8192 pixels, row by row) with ``--workers`` threads, (a) each window to whichever thread is
free (a plain thread pool, as before) and (b) each thread taking its own column band
(``segflow.infer.engine.reader_band``, what the engine does), and reports wall and CPU
seconds of each and their ratio. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ensure_mosaic

from segflow.geometry import Window
from segflow.infer.engine import reader_band
from segflow.io.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
STRIP = 8192  # InferenceOptions.strip_width


def windows(size: int, tile: int, halo: int) -> Iterator[Window]:
    """Every tile's window clipped to the image, in the engine's order."""
    for s in range(0, size, STRIP):
        for r in range(0, size, tile):
            for c in range(s, min(size, s + STRIP), tile):
                r0, c0 = max(0, r - halo), max(0, c - halo)
                yield Window(
                    r0, c0, min(size, r + tile + halo) - r0, min(size, c + tile + halo) - c0
                )


def timed(fn: Callable[[], None]) -> dict[str, float]:
    t, cpu = time.perf_counter(), time.process_time()
    fn()
    return {
        "wall_s": round(time.perf_counter() - t, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
    }


def read_all(path: Path, wins: list[Window], *, workers: int, band: int | None, halo: int) -> None:
    """Read every window (pixels and valid mask, as the engine does) on ``workers`` threads."""
    src = open_source(path)  # a fresh source: fresh handles, cold block caches
    if band is None:  # one pool: each window to whichever thread is free
        pools = [ThreadPoolExecutor(workers)]
    else:  # a one-thread pool per column band
        pools = [ThreadPoolExecutor(1) for _ in range(workers)]
    try:
        futures = []
        for w in wins:
            k = 0 if band is None else ((w.col_off + halo) // band) % workers
            futures.append(pools[k].submit(src.read_with_valid, w))
        for f in futures:
            f.result()
    finally:
        for p in pools:
            p.shutdown()
        src.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=str(ROOT / "bench-data"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    path = ensure_mosaic(work, args.size)
    wins = list(windows(args.size, args.tile, args.halo))
    band = reader_band(STRIP, args.workers, args.tile)
    kw = {"workers": args.workers, "halo": args.halo}
    free = timed(lambda: read_all(path, wins, band=None, **kw))
    banded = timed(lambda: read_all(path, wins, band=band, **kw))
    print(
        json.dumps(
            {
                "gigapixels": round(args.size**2 / 1e9, 3),
                "windows": len(wins),
                "window": args.tile + 2 * args.halo,
                "workers": args.workers,
                "any_free_thread": free,
                "column_bands": {**banded, "band": band},
                "cpu_bands_over_free": round(banded["cpu_s"] / free["cpu_s"], 3),
                "wall_bands_over_free": round(banded["wall_s"] / free["wall_s"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
