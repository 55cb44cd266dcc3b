"""Ingest on object storage: S3 -> S3 against local disk -> local disk, same image.

    python benchmarks/bench_remote_ingest.py [--size 8192] [--workdir bench-data]

Starts a real S3-compatible server on loopback (``moto_server``, as the tests do), uploads
the mosaic GeoTIFF of make_big_geotiff.py, and measures, each in its own process, wall time
and peak memory of segflow's library ingest:

  1. local GeoTIFF -> local scene store (the baseline),
  2. the same GeoTIFF on S3 (read by GDAL's /vsis3/ with ranged GETs) -> a scene store on S3
     (Zarr over obstore, completed by its marker),

and, to show which side limits it, S3 -> local and local -> S3, with the CPU seconds the
server itself spent on each run (it shares the machine's cores with the ingest). Prints
them all, the throughput ratio (2 / 1; the issue aims >= 0.5), the same ratio with the
server's CPU time taken out of the S3 -> S3 wall time (what a server on its own machine
would leave), and whether the two stores hold the same pixels. moto keeps every object in its own memory, so the default size is a
64-megapixel image; ``--size 16384`` takes ~2 GB of the server's memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import ensure_mosaic, measure, python

OURS = """
import sys, json
from segflow.ingest import IngestSpec, ingest
r = ingest(IngestSpec(source=sys.argv[1], out=sys.argv[2], chunk=512))
print(json.dumps(r.to_dict()))
"""


def _same_pixels(a: str | Path, b: str) -> bool:
    import numpy as np

    from segflow.io.store import SceneStore

    sa, sb = SceneStore.open(a), SceneStore.open(b)
    return all(np.array_equal(sa.array(n)[...], sb.array(n)[...]) for n in ("image", "valid"))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--workdir", default="bench-data")
    args = ap.parse_args()
    from segflow.io import remote
    from tests._s3 import start_s3_server

    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    big = ensure_mosaic(work, args.size)
    local_out = work / "remote_bench_local.zarr"
    shutil.rmtree(local_out, ignore_errors=True)
    log = Path(tempfile.mkdtemp(prefix="segflow-bench-s3-")) / "moto.log"
    server = start_s3_server(log)
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("segflow-bench")
        src, out = f"{bucket}/{big.name}", f"{bucket}/scene.zarr"
        remote.upload(big, src)
        runs = {
            "local -> local": (str(big), str(local_out)),
            "S3 -> local": (src, str(work / "remote_bench_read.zarr")),
            "local -> S3": (str(big), f"{bucket}/write.zarr"),
            "S3 -> S3": (src, out),
        }
        got, server_cpu = {}, {}
        for name, (a, b) in runs.items():
            shutil.rmtree(work / "remote_bench_read.zarr", ignore_errors=True)
            before = _cpu_seconds(server.proc.pid)
            got[name] = m = measure(python("-c", OURS, a, b), env=dict(os.environ))
            server_cpu[name] = _cpu_seconds(server.proc.pid) - before
            if m.returncode:
                raise SystemExit(f"{name} failed:\n{m.output[-2000:]}")
        mpx = args.size**2 / 1e6
        print(
            f"image: {args.size} x {args.size} ({mpx:.0f} Mpx), {big.stat().st_size / 2**20:.0f} MiB"
        )
        for name, m in got.items():
            print(f"{name:16s} {m.seconds:7.1f} s  {mpx / m.seconds:6.1f} Mpx/s  "
                  f"peak {m.peak_gib:.2f} GiB  server CPU {server_cpu[name]:5.1f} s")  # fmt: skip
        base, s3 = got["local -> local"].seconds, got["S3 -> S3"].seconds
        print(f"throughput ratio S3 -> S3 / local -> local: {base / s3:.2f} (aim >= 0.5)")
        # the server's CPU time spread over the 2 cores it shares with the ingest
        alone = max(s3 - server_cpu["S3 -> S3"] / (os.cpu_count() or 1), 1e-9)
        print(f"  without the server's share of this machine's cores: {base / alone:.2f}")
        print(f"same pixels: {_same_pixels(local_out, out)}")
    finally:
        server.stop()
        shutil.rmtree(local_out, ignore_errors=True)
        shutil.rmtree(work / "remote_bench_read.zarr", ignore_errors=True)


if __name__ == "__main__":
    main()
