"""segment_region on Dask workers vs in one process, on this machine.

    python benchmarks/bench_segment_distributed.py [--size 8192] [--small 4096]
        [--features 16 --depth 3] [--tile 512] [--workdir bench-data]

A mosaic GeoTIFF (benchmarks/make_big_geotiff.py) and a U-Net big enough that its forward
dominates the run (random weights: speed does not depend on them). Each configuration runs in
a fresh process, measured from the outside (wall time, peak memory of the process tree):

* ``in-process``: the default, one process, torch on every core;
* ``1 worker x 1 thread`` and ``2 workers x 1 thread``: an embedded LocalCluster of worker
  processes (``dask_address`` to it), the coordinator only submitting and recording. One
  worker's reader and writer threads run on the idle second core, so the same worker is also
  run with the whole process tree pinned to one core (``taskset``): two workers on two cores
  over that is the scaling of the task layer, and the CPU seconds of each run say how close
  to the machine's limit it is;
* ``--workers 2``: what a user types, the cluster's start-up included, against in-process:
  which of the two is the default;
* the peak memory of each worker at two image sizes (``--small`` and ``--size``): it must not
  grow with the image.

Prints one JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ensure_mosaic, measure, python
from bench_segment_scale import MAKE_CKPT

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from segflow.config.segment import SegmentRequest
    from segflow.segment import segment_region

    def main():
        image, model, out, tile, mode = sys.argv[1:6]
        kw = {}
        cluster = None
        if mode.startswith("cluster"):  # cluster:N: N workers x 1 thread, started here
            from distributed import LocalCluster
            n = int(mode.split(":")[1])
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0")
            kw["dask_address"] = cluster.scheduler_address
        elif mode.startswith("workers"):
            kw["workers"] = int(mode.split(":")[1])
        t0 = time.perf_counter()
        r = segment_region(SegmentRequest(image=image, model=model, out=out, tile=int(tile),
                                          overwrite=True, **kw))
        wall = time.perf_counter() - t0
        if cluster is not None:
            cluster.close()
        inf = r.inference
        print("RESULT " + json.dumps({"wall": wall, "inference_s": inf["seconds"],
              "model_s": inf["seconds_in_model"], "tiles": inf["tiles"],
              "workers": inf.get("workers")}))

    if __name__ == "__main__":
        main()
    """
)


def run(work: Path, image: Path, model: Path, tile: int, mode: str) -> dict[str, object]:
    out = work / f"out_{mode.replace(':', '').replace('@', '_')}_{image.stem}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, never a resumed one
    out.mkdir()
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    # "@core0": the whole process tree pinned to one core (a one-core machine's run)
    pin = ["taskset", "-c", "0"] if mode.endswith("@core0") else []
    cmd = [*pin, *python(str(driver), str(image), str(model), str(out / "m.tif"), str(tile),
                         mode.removesuffix("@core0"))]  # fmt: skip
    m = measure(cmd)
    if m.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{m.output[-3000:]}")
    line = next(ln for ln in m.output.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result.update(mode=mode, size=image.stem, process_seconds=m.seconds, peak_tree_gib=m.peak_gib,
                  cpu_seconds=m.cpu_seconds)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--small", type=int, default=4096)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--workdir", default="bench-data")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(exist_ok=True)
    big, small = ensure_mosaic(work, args.size), ensure_mosaic(work, args.small)
    model = work / f"unet_f{args.features}_d{args.depth}"
    measure(python("-c", MAKE_CKPT, str(model), str(args.features), str(args.depth)))
    rows = [
        run(work, big, model, args.tile, mode)
        for mode in ("in-process", "cluster:1", "cluster:1@core0", "cluster:2", "workers:2")
    ]
    rows.append(run(work, small, model, args.tile, "cluster:2"))
    by = {(r["mode"], r["size"]): r for r in rows}
    one, two = by[("cluster:1", big.stem)], by[("cluster:2", big.stem)]
    summary = {
        "speedup_2_workers_over_1": one["inference_s"] / two["inference_s"],
        # one worker alone on one core vs two workers on two: the task layer's scaling
        "speedup_2_cores_over_1": by[("cluster:1@core0", big.stem)]["inference_s"]
        / two["inference_s"],
        # the machine's limit for the same work: its CPU time spread over both cores
        "cpu_s_1_worker": one["cpu_seconds"],
        "cpu_s_2_workers": two["cpu_seconds"],
        "wall_2_workers_over_cpu_bound": two["process_seconds"] / (two["cpu_seconds"] / 2),
        "workers_2_over_in_process": by[("workers:2", big.stem)]["wall"]
        / by[("in-process", big.stem)]["wall"],
        "peak_worker_gib": {
            size: max(w["peak_rss_bytes"] for w in by[("cluster:2", size)]["workers"].values())
            / 2**30
            for size in (small.stem, big.stem)
        },
    }
    print(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print("\n| configuration | image | wall s | inference s | model s | CPU s | peak tree GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['size']} | {r['wall']:.1f} | {r['inference_s']:.1f} | "
              f"{r['model_s']:.1f} | {r['cpu_seconds']:.0f} | {r['peak_tree_gib']:.2f} |")  # fmt: skip
    print(f"\n{json.dumps(summary)}")


if __name__ == "__main__":
    main()
