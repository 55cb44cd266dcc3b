"""Prefect flow: segment a region of a large image with a trained model.

    python flows/segment_region.py --image SRC --model CKPT --out OUT.tif
        [--bbox MINX MINY MAXX MAXY [--bbox-crs CRS]] [--window COL ROW WIDTH HEIGHT]
        [--tile 512] [--mode crop|gaussian] [--polygons OUT.gpkg] [--parquet OUT.parquet]
        [--probabilities OUT_probs.tif] [--quicklook OUT.png] [--ome-tiff OUT.ome.tif]
        [--qupath OUT.geojson] [--tta [SET]] [--batch-size 8] [--device cpu|cuda] [--level 0]
        [--work STORE] [--into-store] [--overwrite] [--debug]

With no arguments it segments the bundled SpaceNet Atlanta chip with the demo model
(outputs/spacenet_atlanta_buildings/train/best, made by `make demo`). A killed run resumes: run the same command again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import ROOT, run_cli, tqdm_progress
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.errors import ConfigError
from segflow.segment import SegmentRequest, check_request, segment_region

DEMO_IMAGE = ROOT / "data/samples/spacenet_atlanta/sample_geotiff.tif"
DEMO_MODEL = ROOT / "outputs/spacenet_atlanta_buildings/train/best"
DEMO_OUT = ROOT / "outputs/spacenet_atlanta_buildings"


@task(name="segment-region", cache_policy=NO_CACHE)
def segment_task(req: SegmentRequest) -> dict[str, Any]:
    """One coarse task: tiles are batched and streamed inside it."""
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm_progress(total, f"segment {Path(req.image).name}")
            bar.update(done - 1)
        bar.update(1)

    report = segment_region(req, progress=progress)
    if bar is not None:
        bar.close()
    return report.to_dict()


@flow(name="segment_region", log_prints=False)
def segment_region_flow(  # noqa: PLR0913 (one flat parameter per option, for deployments)
    image: str,
    model: str,
    out: str,
    bbox: tuple[float, float, float, float] | None = None,
    bbox_crs: str | None = None,
    window: tuple[int, int, int, int] | None = None,
    level: int = 0,
    tile: int = 512,
    mode: Literal["crop", "gaussian"] = "crop",
    overlap: float = 0.5,
    batch_size: int = 8,
    tta_flips: bool = False,
    tta_set: Literal["flips", "horizontal", "rot180"] | None = None,
    device: str | None = None,
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto",
    polygons: str | None = None,
    parquet: str | None = None,
    probabilities: str | None = None,
    quicklook: str | None = None,
    ome_tiff: str | None = None,
    qupath_geojson: str | None = None,
    work: str | None = None,
    min_area: float = 0.0,
    into_store: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Segment ``image`` over the requested region with ``model``; write ``out`` and the rest.

    One flat parameter per option of :class:`segflow.segment.SegmentRequest` (same names and
    meaning as the command line's), so a deployment run can override any one of them.
    """
    req = SegmentRequest(
        image=image,
        model=model,
        out=out,
        bbox=tuple(bbox) if bbox is not None else None,  # type: ignore[arg-type]
        bbox_crs=bbox_crs,
        window=tuple(window) if window is not None else None,  # type: ignore[arg-type]
        level=level,
        tile=tile,
        mode=mode,
        overlap=overlap,
        batch_size=batch_size,
        tta_flips=tta_flips,
        tta_set=tta_set,
        device=device,
        amp=amp,
        polygons=polygons,
        parquet=parquet,
        probabilities=probabilities,
        quicklook=quicklook,
        ome_tiff=ome_tiff,
        qupath_geojson=qupath_geojson,
        work=work,
        min_area=min_area,
        into_store=into_store,
        overwrite=overwrite,
    )
    report = segment_task(req)  # segment_region checks the request before writing anything
    create_markdown_artifact(
        key="segment-region-summary",
        markdown=summary(report),
        description=f"segment_region of {req.image}",
    )
    return report


def summary(r: dict[str, Any]) -> str:
    """A markdown summary: region, tiles, time, class areas, outputs."""
    reg, inf = r["region"], r["inference"]
    lines = [
        "### segflow segment_region",
        "",
        "| | |",
        "|---|---|",
        f"| region | cols {reg['col_off']}..{reg['col_off'] + reg['width']}, rows {reg['row_off']}..{reg['row_off'] + reg['height']} ({reg['width']} x {reg['height']} px) |",
        f"| tiles | {inf['tiles']} ({inf['skipped_units']} units resumed) on {inf['device']} |",
        f"| time | {r['seconds']:.1f} s total, {inf['seconds_in_model']:.1f} s in the model |",
    ]
    lines += [f"| {name} | {px} px |" for name, px in r["class_pixels"].items()]
    lines += [f"| {k} | `{v}` |" for k, v in r["outputs"].items()]
    if r.get("outputs", {}).get("quicklook"):
        lines += ["", f"![quick-look]({Path(r['outputs']['quicklook']).resolve().as_uri()})"]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/segment_region.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--image", help="GeoTIFF/COG/VRT, SVS/OME-TIFF slide, PNG/TIFF, or a scene store"
    )
    p.add_argument("--model", help="checkpoint directory written by flows/train.py")
    p.add_argument("--out", help="class-id Cloud-Optimized GeoTIFF to write")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("MINX", "MINY", "MAXX", "MAXY"))
    p.add_argument(
        "--bbox-crs", help="CRS of --bbox (default: the image's; 'um' or 'px' for slides)"
    )
    p.add_argument("--window", nargs=4, type=int, metavar=("COL", "ROW", "WIDTH", "HEIGHT"))
    p.add_argument("--level", type=int, default=0, help="slide pyramid level (default 0)")
    p.add_argument("--tile", type=int, default=512, help="output tile size in pixels (default 512)")
    p.add_argument("--mode", choices=("crop", "gaussian"), default="crop")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap for --mode gaussian")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--tta",
        nargs="?",
        const="auto",
        choices=("auto", "flips", "horizontal", "rot180"),
        help="flip test-time augmentation: auto (the default) averages over the flips the model "
        "was trained with; horizontal, rot180 or flips name them",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    p.add_argument("--polygons", help="GeoPackage of predicted polygons")
    p.add_argument("--parquet", help="GeoParquet of predicted polygons")
    p.add_argument("--probabilities", help="uint8 class-probability COG")
    p.add_argument("--quicklook", help="PNG of the mask over the image")
    p.add_argument("--ome-tiff", help="pyramidal OME-TIFF label image (slides)")
    p.add_argument("--qupath", help="GeoJSON polygons in slide pixels for QuPath")
    p.add_argument("--work", help="prediction store (default: OUT.predictions.zarr)")
    p.add_argument(
        "--into-store",
        action="store_true",
        help="with a scene store as --image: write the predictions into it (default: --work)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files at the output paths (default: only this command's own)",
    )
    return p


def request_from_args(args: argparse.Namespace) -> SegmentRequest:
    if args.image is None and args.model is None and args.out is None:
        if not (DEMO_MODEL / "checkpoint.json").is_file():
            raise ConfigError(
                f"no demo model at {str(DEMO_MODEL)!r}: run `make demo` first, or pass --image, --model and --out"
            )
        DEMO_OUT.mkdir(parents=True, exist_ok=True)
        args.image, args.model, args.out = (
            str(DEMO_IMAGE),
            str(DEMO_MODEL),
            str(DEMO_OUT / "segment_region.tif"),
        )
        args.polygons = args.polygons or str(DEMO_OUT / "segment_region.gpkg")
        args.quicklook = args.quicklook or str(DEMO_OUT / "segment_region.png")
    missing = [f"--{n}" for n in ("image", "model", "out") if getattr(args, n) is None]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}: give --image, --model and --out (or no arguments for the demo)"
        )
    return SegmentRequest(
        image=args.image,
        model=args.model,
        out=args.out,
        bbox=tuple(args.bbox) if args.bbox else None,
        bbox_crs=args.bbox_crs,
        window=tuple(args.window) if args.window else None,
        level=args.level,
        tile=args.tile,
        mode=args.mode,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta_flips=args.tta is not None,
        tta_set=None if args.tta in (None, "auto") else args.tta,
        device=args.device,
        amp=args.amp,
        polygons=args.polygons,
        parquet=args.parquet,
        probabilities=args.probabilities,
        quicklook=args.quicklook,
        ome_tiff=args.ome_tiff,
        qupath_geojson=args.qupath,
        work=args.work,
        into_store=args.into_store,
        overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> None:
    req = request_from_args(parser().parse_args(argv))
    check_request(req)  # fail in a second, before Prefect starts
    r = segment_region_flow(**asdict(req))
    print(
        f"{req.out}: {r['region']['width']} x {r['region']['height']} px in {r['seconds']:.1f} s "
        f"(inference {r['inference']['seconds']:.1f} s, model forward {r['inference']['seconds_in_model']:.1f} s)"
    )
    for name, path in r["outputs"].items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    run_cli(main)
