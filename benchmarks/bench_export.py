"""Benchmark the streaming exporters against whole-array baselines.

A square label array (default 16384 x 16384 uint8) is built in a Zarr store by mirror-tiling
the building mask rasterized from the bundled SpaceNet Atlanta chip (real footprints; mirrored
so buildings continue across the tile borders). Each measurement runs in a fresh subprocess
and reports wall time and peak RSS (``ru_maxrss``), plus the RSS right after the imports:

- ``cog``        :func:`segflow.io.export.write_cog` reading the Zarr array window by window
- ``cog_whole``  baseline: the whole array in memory -> in-memory GTiff -> GDAL COG driver
- ``vec``        :func:`segflow.io.export.vectorize` (window 1024) -> GeoParquet
- ``vec_gpkg``   the same -> GeoPackage + GeoParquet
- ``vec_whole``  baseline: whole array -> ``rasterio.features.shapes`` -> GeoParquet
- ``ome``        :func:`segflow.io.export.write_ome_tiff_labels` (tile 512)

Usage::

    python benchmarks/bench_export.py [--size 16384] [--out outputs/bench_export] [--only cog,vec]

Prints a Markdown table and writes ``results-<size>.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "spacenet_atlanta"
CHUNK = 512
PIXEL = 0.5  # m, as the sample chip

MODES = ("cog", "cog_whole", "vec", "vec_gpkg", "vec_whole", "ome")


def chip_labels() -> tuple[np.ndarray, Any]:
    import rasterio
    import rasterio.features

    with rasterio.open(SAMPLE / "sample_geotiff.tif") as src:
        transform, crs, shape = src.transform, src.crs, src.shape
    feats = json.loads((SAMPLE / "geotiff_labels.geojson").read_text())["features"]
    labels = rasterio.features.rasterize(
        [(f["geometry"], 1) for f in feats], out_shape=shape, transform=transform, dtype="uint8"
    )
    return labels, crs


def mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror tiling (d c b a | a b c d | d c b a): buildings continue across tile borders."""
    m = idx % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def build_store(path: Path, size: int) -> None:
    import zarr

    if (path / "zarr.json").exists():
        return
    chip, _ = chip_labels()
    arr = zarr.create_array(
        store=str(path),
        shape=(size, size),
        chunks=(CHUNK, CHUNK),
        dtype="uint8",
        fill_value=0,
        zarr_format=3,
    )
    n = chip.shape[0]
    strip = 4096
    for r0 in range(0, size, strip):
        rows = mirror_index(np.arange(r0, min(r0 + strip, size)), n)
        cols = mirror_index(np.arange(size), n)
        arr[r0 : r0 + len(rows), :] = chip[np.ix_(rows, cols)]


def georef(size: int) -> Any:
    from affine import Affine

    from segflow.io.store import GeoRef

    _, crs = chip_labels()
    t = Affine(PIXEL, 0.0, 733601.0, 0.0, -PIXEL, 3725139.0)
    return GeoRef(crs_wkt=crs.to_wkt(), epsg=crs.to_epsg(), geotransform=t.to_gdal())


CLASSES = [
    {"id": 0, "name": "background", "color": "#000000"},
    {"id": 1, "name": "building", "color": "#ff0000"},
]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, store: Path, out: Path, size: int) -> dict[str, Any]:
    # libraries the exporters import lazily, imported up front so that
    # "RSS after imports" is the floor and the difference is the work
    import geopandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import pyogrio  # noqa: F401
    import rasterio
    import rasterio.features
    import rasterio.shutil
    import shapely
    import tifffile  # noqa: F401
    import zarr
    from shapely.geometry import shape

    from segflow.io.export import vectorize, write_cog, write_ome_tiff_labels

    arr = zarr.open_array(str(store), mode="r")
    gr = georef(size)
    base = rss_mib()
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if mode == "cog":
        write_cog(arr, out / "cog.tif", georef=gr, classes=CLASSES, nodata=255)
    elif mode == "cog_whole":
        from rasterio.io import MemoryFile

        data = arr[...]
        profile = {
            "driver": "GTiff",
            "width": size,
            "height": size,
            "count": 1,
            "dtype": "uint8",
            "nodata": 255,
            "crs": f"EPSG:{gr.epsg}",
            "transform": gr.affine(),
        }
        with MemoryFile() as mem:
            with mem.open(**profile) as dst:
                dst.write(data, 1)
            del data
            with rasterio.Env(GDAL_CACHEMAX=64):
                rasterio.shutil.copy(
                    mem.name,
                    str(out / "cog_whole.tif"),
                    driver="COG",
                    BLOCKSIZE=512,
                    COMPRESS="DEFLATE",
                    BIGTIFF="IF_SAFER",
                    OVERVIEW_RESAMPLING="MODE",
                )
    elif mode in ("vec", "vec_gpkg"):
        res = vectorize(
            arr,
            georef=gr,
            classes=CLASSES,
            nodata=255,
            window=1024,
            out_parquet=out / f"{mode}.parquet",
            out_gpkg=out / f"{mode}.gpkg" if mode == "vec_gpkg" else None,
        )
        info = {
            "n": res.n_features,
            "area": res.total_area,
            "max_pending_pieces": res.max_pending_pieces,
        }
    elif mode == "vec_whole":
        import geopandas as gpd

        data = arr[...]
        geoms = [
            shape(g)
            for g, _ in rasterio.features.shapes(
                data, mask=data == 1, connectivity=4, transform=gr.affine()
            )
        ]
        gdf = gpd.GeoDataFrame(
            {"class_id": np.ones(len(geoms), "int32")}, geometry=geoms, crs=f"EPSG:{gr.epsg}"
        )
        gdf.to_parquet(out / "vec_whole.parquet")
        info = {"n": len(geoms), "area": float(shapely.area(np.array(geoms)).sum())}
    elif mode == "ome":
        write_ome_tiff_labels(arr, out / "labels.ome.tif", mpp_x=0.5, mpp_y=0.5, classes=CLASSES)
    else:
        raise SystemExit(f"unknown mode {mode!r}: one of {MODES}")
    wall = time.perf_counter() - t0
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(rss_mib(), 1),
        "rss_after_imports_mib": round(base, 1),
        **info,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_export")
    ap.add_argument("--only", default=",".join(MODES))
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per mode: the fastest wall time and the largest peak RSS are kept",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out / str(args.size)
    store = out / "labels.zarr"
    if args.child:
        print(json.dumps(child(args.child, store, out, args.size)))
        return
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    build_store(store, args.size)
    print(
        f"label store {args.size} x {args.size} ready in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    results = {}
    for mode in args.only.split(","):
        runs = []
        for _ in range(max(1, args.repeat)):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--size",
                    str(args.size),
                    "--out",
                    str(args.out),
                    "--child",
                    mode,
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{mode} failed")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr)
        best = dict(min(runs, key=lambda r: r["wall_s"]))
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        best["runs"] = len(runs)
        results[mode] = best
    for name in ("cog.tif", "cog_whole.tif", "vec.parquet", "vec_gpkg.gpkg", "labels.ome.tif"):
        if (out / name).exists():
            results.setdefault("sizes_mib", {})[name] = round(
                (out / name).stat().st_size / 2**20, 1
            )
    if "cog" in results:
        from rio_cogeo.cogeo import cog_validate

        results["cog"]["valid"] = cog_validate(str(out / "cog.tif"))[0]

    def ratio(a: str, b: str, key: str) -> str:
        if a in results and b in results:
            return f"{results[a][key] / results[b][key]:.2f}"
        return "-"

    lines = [
        f"## bench_export: {args.size} x {args.size} uint8 labels (Zarr, {CHUNK}^2 chunks)",
        "",
        f"(best wall time of {args.repeat} run(s), largest peak RSS; one process per run)",
        "",
        "| mode | wall s | peak RSS MiB | RSS after imports MiB | notes |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        if mode in results:
            r = results[mode]
            notes = ", ".join(
                f"{k}={v}"
                for k, v in r.items()
                if k not in ("mode", "wall_s", "peak_rss_mib", "rss_after_imports_mib", "runs")
            )
            lines.append(
                f"| {mode} | {r['wall_s']} | {r['peak_rss_mib']} | "
                f"{r['rss_after_imports_mib']} | {notes} |"
            )
    lines += [
        "",
        f"- COG streamed / whole-array: time {ratio('cog', 'cog_whole', 'wall_s')}, "
        f"peak RSS {ratio('cog', 'cog_whole', 'peak_rss_mib')}",
        f"- vectorize windowed / whole-array shapes: time {ratio('vec', 'vec_whole', 'wall_s')}, "
        f"peak RSS {ratio('vec', 'vec_whole', 'peak_rss_mib')}",
    ]
    if "vec" in results and "vec_whole" in results:
        same = (
            results["vec"]["n"] == results["vec_whole"]["n"]
            and abs(results["vec"]["area"] - results["vec_whole"]["area"]) < 1e-6
        )
        lines.append(f"- windowed polygons match whole-array count and area: {same}")
    if "sizes_mib" in results:
        lines.append(f"- output sizes MiB: {results['sizes_mib']}")
    print("\n".join(lines))
    (out / f"results-{args.size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
