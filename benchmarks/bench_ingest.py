"""Ingest throughput and memory: segflow vs rioxarray.open_rasterio(chunks).to_zarr, same chunks and codec.

    python benchmarks/bench_ingest.py [--size 32768] [--workdir bench-data]

Builds a >= 1 gigapixel GeoTIFF from the real SpaceNet chip (once), then, each in its own
process, measures wall time and peak memory of the whole process tree for:
  1. segflow's library ingest (thread pool, one per core),
  2. the rioxarray + dask route a user would write by hand, with the same 512 chunks and
     Blosc-zstd/bitshuffle codec,
  3. the full Prefect flow `flows/ingest.py` (embedded Dask LocalCluster + Prefect API server).
Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ensure_mosaic, measure, python

ROOT = Path(__file__).resolve().parents[1]

OURS = """
import sys, json
from segflow.ingest import IngestSpec, ingest
r = ingest(IngestSpec(source=sys.argv[1], out=sys.argv[2], chunk=512))
print(json.dumps(r.to_dict()))
"""

RIOXARRAY = """
import sys, dask, rioxarray
from zarr.codecs import BloscCodec
da = rioxarray.open_rasterio(sys.argv[1], chunks={"band": -1, "y": 512, "x": 512}, lock=False)
ds = da.to_dataset(name="image")
enc = {"image": {"compressors": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                 "chunks": (da.shape[0], 512, 512)}}
with dask.config.set(scheduler="threads"):
    ds.to_zarr(sys.argv[2], zarr_format=3, encoding=enc, consolidated=True, mode="w")
"""


def kill_and_resume(big: Path, work: Path, after: float) -> dict[str, object]:
    """kill -9 a flow run after ``after`` s, run the same command again, compare with ours.zarr."""
    import os
    import signal
    import time

    import numpy as np

    from segflow.io.store import SceneStore, staging_path

    out = work / "resume.zarr"
    cmd = python(str(ROOT / "flows/ingest.py"), str(big), "--out", str(out))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(SceneStore.open(staging_path(out)).progress("ingest").done())
    m = measure(cmd)
    skipped = int(re.search(r"(\d+) skipped", m.output).group(1))  # type: ignore[union-attr]
    a, b = SceneStore.open(out), SceneStore.open(work / "ours.zarr")
    equal = True
    for name in ("image", "valid"):
        x, y = a.array(name), b.array(name)
        for r in range(0, a.height, 4096):
            equal &= bool(np.array_equal(x[..., r : r + 4096, :], y[..., r : r + 4096, :]))
    return {
        "killed_after_s": after,
        "units_done_at_kill": done,
        "units_skipped_on_resume": skipped,
        "resume_s": round(m.seconds, 1),
        "equal_to_uninterrupted": equal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--workdir", default=str(ROOT / "bench-data"))
    ap.add_argument("--skip-flow", action="store_true")
    ap.add_argument(
        "--kill-after",
        type=float,
        default=0.0,
        help="also SIGKILL a flow run after this many seconds, resume it, and compare",
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    big = ensure_mosaic(work, args.size)
    gpx = args.size**2 / 1e9
    runs = {}
    for name, cmd in [
        ("segflow", python("-c", OURS, str(big), str(work / "ours.zarr"))),
        ("rioxarray", python("-c", RIOXARRAY, str(big), str(work / "rx.zarr"))),
        *(
            []
            if args.skip_flow
            else [
                (
                    "segflow flow",
                    python(
                        str(ROOT / "flows/ingest.py"), str(big), "--out", str(work / "flow.zarr")
                    ),
                )
            ]
        ),
    ]:
        for out in work.glob("*.zarr*"):
            if out.name != "ours.zarr":
                shutil.rmtree(out)
        m = measure(cmd)
        if m.returncode != 0:
            raise SystemExit(f"{name} failed:\n{m.output[-3000:]}")
        runs[name] = m
        print(
            f"{name:14s} {m.seconds:7.1f} s  {gpx / m.seconds * 1000:7.1f} Mpx/s  peak {m.peak_gib:5.2f} GiB",
            flush=True,
        )
    ours, rx = runs["segflow"], runs["rioxarray"]
    resume = kill_and_resume(big, work, args.kill_after) if args.kill_after else None
    summary = {
        "gigapixels": round(gpx, 3),
        "segflow_s": round(ours.seconds, 1),
        "rioxarray_s": round(rx.seconds, 1),
        "speedup_vs_rioxarray": round(rx.seconds / ours.seconds, 2),
        "segflow_peak_gib": round(ours.peak_gib, 2),
        "rioxarray_peak_gib": round(rx.peak_gib, 2),
        "memory_ratio_rioxarray_over_segflow": round(rx.peak_gib / ours.peak_gib, 2),
    }
    if "segflow flow" in runs:
        summary["flow_s"] = round(runs["segflow flow"].seconds, 1)
        summary["flow_peak_gib"] = round(runs["segflow flow"].peak_gib, 2)
    if resume:
        summary["resume"] = resume
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
