"""segment_collection over many small scenes: 2 Dask workers against 1, and memory against the
number of scenes.

    python benchmarks/bench_collection.py [--scenes 40] [--side 256] [--workdir bench-data]

Cuts --scenes windows of --side pixels out of the bundled SpaceNet chip (GeoTIFFs, like
``gdal_translate -srcwin``), saves a small untrained U-Net, and runs the library's
segment_collection in a fresh process for each setting, measuring wall time and the peak
RSS of the whole process tree (workers included):

  1. an embedded cluster of 1 worker process, then of 2 (the cores shared among them),
     over all the scenes: the speed-up (the issue aims >= 1.7x on 2 cores). One worker
     already runs its scene's forward on every core, so this is the gain over the best
     single-worker run; 1 worker pinned to one core (``taskset -c 0``) gives the scaling
     of the scenes over the cores;
  2. both again over a quarter of the scenes: the peak memory ratio of all / a quarter
     (flat: about 1), and each setting's time per scene once its fixed cost (cluster and
     worker start-up, the mosaic) is taken out: (T(all) - T(quarter)) / (the difference in
     scenes), whose ratio is the speed-up of the scenes themselves.

Every run writes the summary and the mosaic too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import measure, python

CHIP = Path(__file__).resolve().parents[1] / "data/samples/spacenet_atlanta/sample_geotiff.tif"
RUN = """
import sys, json
from segflow.config.collection import CollectionRequest
from segflow.stages.collection import collection_client, segment_collection
req = CollectionRequest.model_validate_json(sys.argv[1])
with collection_client(req) as client:
    r = segment_collection(req, client=client)
print(json.dumps(r.to_dict()["counts"]))
"""


def make_scenes(folder: Path, n: int, side: int) -> None:
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with rasterio.open(CHIP) as src:
        for i in range(n):
            r, c = (int(v) // 4 * 4 for v in rng.integers(0, src.height - side, 2))
            win = Window(c, r, side, side)
            profile = dict(src.profile, height=side, width=side,
                           transform=src.window_transform(win))  # fmt: skip
            with rasterio.open(folder / f"s{i:03d}.tif", "w", **profile) as dst:
                dst.write(src.read(window=win))


def make_model(path: Path) -> None:
    import torch

    from segflow.config import ClassDef
    from segflow.train.checkpoint import build_meta, save_checkpoint
    from segflow.train.models import ModelConfig, build_model

    cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=8, depth=2,
                      num_res_units=0, norm="none")  # fmt: skip
    torch.manual_seed(0)
    classes = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building"))
    meta = build_meta(cfg, bands=("pan",), mean=[300.0], std=[150.0], tile=256, classes=classes)
    if path.exists():
        shutil.rmtree(path)
    save_checkpoint(path, build_model(cfg), meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--workdir", default="bench-data")
    args = ap.parse_args()
    from segflow.config.collection import CollectionRequest

    work = Path(args.workdir) / "collection"
    shutil.rmtree(work, ignore_errors=True)
    make_scenes(work / "scenes", args.scenes, args.side)
    make_model(work / "model")
    quarter = work / "quarter"
    quarter.mkdir()
    for p in sorted((work / "scenes").glob("*.tif"))[: max(1, args.scenes // 4)]:
        shutil.copy(p, quarter / p.name)

    def run(name: str, scenes: Path, workers: int, *, pin: bool = False):  # type: ignore[no-untyped-def]
        req = CollectionRequest(scenes=str(scenes / "*.tif"), model=str(work / "model"),
                                out_dir=str(work / name), workers=workers, tile=256)  # fmt: skip
        m = measure(
            [*(["taskset", "-c", "0"] if pin else []), *python("-c", RUN, req.model_dump_json())]
        )
        if m.returncode:
            raise SystemExit(f"{name} failed:\n{m.output[-3000:]}")
        counts = json.loads(m.output.strip().splitlines()[-1])
        assert counts["done"] == len(list(scenes.glob("*.tif"))), counts
        return m

    one = run("one_worker", work / "scenes", 1)
    two = run("two_workers", work / "scenes", 2)
    one_few = run("one_worker_quarter", quarter, 1)
    few = run("two_workers_quarter", quarter, 2)
    pinned = run("one_worker_one_core", work / "scenes", 1, pin=True)
    n, q = args.scenes, max(1, args.scenes // 4)
    print(f"{n} scenes of {args.side} x {args.side} px")
    for label, m in (("1 worker", one), ("2 workers", two), (f"1 worker, {q} scenes", one_few),
                     (f"2 workers, {q} scenes", few), ("1 worker on 1 core", pinned)):  # fmt: skip
        print(f"{label:24s} {m.seconds:6.1f} s  peak {m.peak_gib:.2f} GiB")
    print(f"speed-up 2 workers / 1 worker: {one.seconds / two.seconds:.2f}x end to end "
          f"(aim >= 1.7); over 1 worker on 1 core: {pinned.seconds / two.seconds:.2f}x")  # fmt: skip
    per_one = (one.seconds - one_few.seconds) / (n - q)
    per_two = (two.seconds - few.seconds) / (n - q)
    print(f"  per scene, fixed costs out: {per_one:.2f} s vs {per_two:.2f} s: "
          f"{per_one / per_two:.2f}x; fixed cost {one_few.seconds - q * per_one:.1f} s (1 worker), "
          f"{few.seconds - q * per_two:.1f} s (2 workers)")  # fmt: skip
    print(f"peak memory {n} / {q} scenes: {two.peak_gib / few.peak_gib:.2f} (flat: ~1)")


if __name__ == "__main__":
    main()
