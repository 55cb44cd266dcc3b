"""Zarr on object storage: obstore's store (what segflow uses) against fsspec's (s3fs).

    python benchmarks/bench_zarr_stores.py [--size 4096] [--chunk 512]

Starts the tests' loopback S3 server (moto_server), then writes and reads back the same
uint16 array (Blosc zstd, the scene stores' codec) through ``zarr.storage.ObjectStore``
over an obstore ``S3Store`` and through ``zarr.storage.FsspecStore`` over s3fs, each twice
(the better time counts), and a local directory store as the machine's limit. Prints the
seconds and MB/s of each, the ratios to obstore, and whether every read equals the array.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _array(size: int) -> np.ndarray:
    """Smooth structure plus noise: compresses about as a satellite band does."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = (np.sin(x / 97.0) + np.cos(y / 61.0)) * 800 + 2000
    return (base + rng.normal(0, 40, (size, size))).astype(np.uint16)


def _round_trip(store: Any, data: np.ndarray, chunk: int) -> tuple[float, float, bool]:
    import zarr
    from zarr.codecs import BloscCodec

    t0 = time.perf_counter()
    arr = zarr.create_array(store, shape=data.shape, dtype=data.dtype, chunks=(chunk, chunk),
                            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                            overwrite=True)  # fmt: skip
    arr[...] = data
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zarr.open_array(store, mode="r")[...]
    return write, time.perf_counter() - t0, bool(np.array_equal(back, data))


def _best(make: Callable[[int], Any], data: np.ndarray, chunk: int) -> tuple[float, float, bool]:
    runs = [_round_trip(make(i), data, chunk) for i in range(2)]
    return min(r[0] for r in runs), min(r[1] for r in runs), all(r[2] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    import zarr.storage
    from obstore.store import S3Store

    from tests._s3 import KEY_ID, SECRET, start_s3_server

    data = _array(args.size)
    mb = data.nbytes / 1e6
    server = start_s3_server(Path(tempfile.mkdtemp(prefix="segflow-bench-")) / "moto.log")
    try:
        os.environ.update(server.env())
        server.create_bucket("zbench")
        opts = {"key": KEY_ID, "secret": SECRET, "endpoint_url": server.endpoint}
        results = {
            "local directory": _best(
                lambda i: zarr.storage.LocalStore(tempfile.mkdtemp() + f"/a{i}.zarr"),
                data,
                args.chunk,
            ),
            "obstore": _best(
                lambda i: zarr.storage.ObjectStore(
                    S3Store(
                        "zbench",
                        prefix=f"ob{i}.zarr",
                        config={"endpoint": server.endpoint},
                        client_options={"allow_http": True},
                    )
                ),
                data,
                args.chunk,
            ),
            "fsspec (s3fs)": _best(
                lambda i: zarr.storage.FsspecStore.from_url(
                    f"s3://zbench/fs{i}.zarr", storage_options=opts
                ),
                data,
                args.chunk,
            ),
        }
    finally:
        server.stop()
    print(f"array {args.size} x {args.size} uint16 ({mb:.0f} MB), chunks {args.chunk}")
    ob_w, ob_r, _ = results["obstore"]
    for name, (w, r, same) in results.items():
        print(f"{name:16s} write {w:6.2f} s ({mb / w:6.1f} MB/s, x{w / ob_w:4.2f} obstore)  "
              f"read {r:6.2f} s ({mb / r:6.1f} MB/s, x{r / ob_r:4.2f} obstore)  equal: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
