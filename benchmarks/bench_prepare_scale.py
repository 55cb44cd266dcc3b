"""The border-weight map at scale: a >= 1 gigapixel instance raster in bounded memory per worker.

    python benchmarks/bench_prepare_scale.py [--size 32768] [--workers 2] [--workdir bench-data]

1. Builds (once) a ``size`` x ``size`` scene store whose ``instances`` are a mosaic of the six
   real DSB 2018 nucleus label images (seeded flips/rotations, ids unique over the scene),
   written one 4096 x 4096 shard at a time (512 chunks): the raster is never whole in memory.
2. Runs :func:`segflow.prepare.write_weights` (U-Net border term with w0=10, sigma=5,
   eps=1e-3, class weight 1) on an embedded Dask cluster of ``--workers`` single-threaded worker
   processes, and reports wall time, pixels/s, and each worker's peak resident memory
   (``getrusage`` in the worker process, plus the largest RSS sampled by psutil).
3. Checks random windows of the written map against :func:`segflow.weights.border_term` on the
   same window grown by the halo (must be identical).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_border_weights import count_objects, dsb_labels, mosaic  # noqa: E402

from segflow.cluster import dask_client  # noqa: E402
from segflow.config import PrepareConfig  # noqa: E402
from segflow.geometry import Window  # noqa: E402
from segflow.io.store import SceneStore  # noqa: E402
from segflow.prepare import write_weights  # noqa: E402
from segflow.weights import border_halo, border_term  # noqa: E402

ID_STRIDE = 1 << 16  # ids of write unit k are k * ID_STRIDE + 1 ...: unique over the scene


def build_store(path: Path, size: int, *, chunk: int, shard: int) -> int:
    """Write the instance mosaic shard by shard; returns the number of objects."""
    if path.exists():
        store = SceneStore.open(path)
        if store.has("instances") and store.height == size:
            return int((store.array_params("instances") or {}).get("objects", 0))
        shutil.rmtree(path)
    store = SceneStore.create(
        path, bands=("gray",), height=size, width=size, dtype="uint8", chunk=chunk, shard=shard
    )
    store.create_array("instances", dtype="uint32", fill_value=0)
    tiles = dsb_labels()
    objects = 0
    t0 = time.perf_counter()
    for k, (index, window) in enumerate(store.grid):
        unit = mosaic(max(window.height, window.width), seed=k, tiles=tiles)[
            : window.height, : window.width
        ]
        assert int(unit.max()) < ID_STRIDE
        objects += count_objects(unit)
        store.write_window(
            "instances", window, np.where(unit > 0, unit + np.uint32(k * ID_STRIDE), 0)
        )
        print(
            f"\r  unit {index.key}: {objects} objects so far, {time.perf_counter() - t0:.0f} s",
            end="",
            flush=True,
        )
    print()
    store.record_array("instances", source="benchmark mosaic of DSB 2018 labels", objects=objects)
    return objects


def worker_peak_rss() -> int:
    """Peak resident memory of this process in bytes (run on each worker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample_rss(client: Any, stop: threading.Event, peaks: dict[str, int]) -> None:
    import psutil

    pids = client.run(lambda: __import__("os").getpid())
    procs = {addr: psutil.Process(pid) for addr, pid in pids.items()}
    while not stop.is_set():
        for addr, p in procs.items():
            with contextlib.suppress(psutil.Error):
                peaks[addr] = max(peaks.get(addr, 0), p.memory_info().rss)
        time.sleep(0.2)


def check_windows(store: SceneStore, halo: int, count: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    inst, weights = store.array("instances"), store.array("weights")
    checked = 0
    for _ in range(count):
        r, c = (int(v) for v in rng.integers(0, store.height - 512, 2))
        win = Window(r, c, 512, 512)
        outer = Window.from_bounds(
            max(r - halo, 0),
            max(c - halo, 0),
            min(r + 512 + halo, store.height),
            min(c + 512 + halo, store.width),
        )
        term = border_term(np.asarray(inst[outer.slices]))[win.relative_to(outer).slices]
        assert np.array_equal(np.asarray(weights[win.slices]), 1 + term), f"mismatch at {win}"
        checked += 1
    return checked


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=32768, help="side in pixels (32768^2 = 1.07 Gpx)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="4GiB", help="per worker (Dask pauses at 80 %%)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--shard", type=int, default=4096)
    ap.add_argument("--workdir", default=str(ROOT / "bench-data"))
    ap.add_argument("--check", type=int, default=8, help="random 512^2 windows to verify")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    path = Path(args.workdir) / f"instances_{args.size}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)

    print(f"building {path} ({args.size}^2 = {args.size**2 / 1e9:.2f} Gpx) ...")
    t0 = time.perf_counter()
    objects = build_store(path, args.size, chunk=args.chunk, shard=args.shard)
    build_s = time.perf_counter() - t0
    print(f"  {objects} objects ({build_s:.0f} s)")

    cfg = PrepareConfig()
    halo = border_halo(cfg.w0, cfg.sigma, cfg.eps)
    peaks: dict[str, int] = {}
    with dask_client(
        n_workers=args.workers, threads_per_worker=1, processes=True, memory_limit=args.memory_limit
    ) as client:
        from distributed import progress

        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(client, stop, peaks), daemon=True)
        sampler.start()
        store = SceneStore.open(path, mode="r+")
        t0 = time.perf_counter()
        write_weights(
            store,
            cfg,
            {},
            client=client,
            force=True,
            progress=lambda f: progress(f, notebook=False) if sys.stdout.isatty() else None,
        )
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        rusage = client.run(worker_peak_rss)
    checked = check_windows(SceneStore.open(path), halo, args.check)
    pixels = args.size**2
    res = {
        "size": args.size,
        "pixels": pixels,
        "objects": objects,
        "chunk": args.chunk,
        "shard": args.shard,
        "workers": args.workers,
        "threads_per_worker": 1,
        "seconds": seconds,
        "pixels_per_s": pixels / seconds,
        "worker_peak_rss_bytes_getrusage": rusage,
        "worker_peak_rss_bytes_sampled": peaks,
        "max_worker_peak_gib": max(rusage.values()) / 2**30,
        "windows_checked": checked,
        "build_seconds": build_s,
    }
    print(
        f"\nweights of {pixels / 1e9:.2f} Gpx, {objects} objects: {seconds:.0f} s, "
        f"{pixels / seconds / 1e6:.2f} Mpx/s on {args.workers} worker(s) x 1 thread"
    )
    for addr, b in rusage.items():
        print(
            f"  worker {addr}: peak RSS {b / 2**30:.2f} GiB (getrusage), "
            f"{peaks.get(addr, 0) / 2**30:.2f} GiB (sampled)"
        )
    print(f"  {checked} random 512^2 windows identical to a direct computation")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
