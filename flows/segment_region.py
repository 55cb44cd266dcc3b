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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import ROOT, run_cli, tqdm_progress
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while torch and the model load
    warm_prefect_api()
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.config.cli import add_options, model_from_args, model_signature
from segflow.config.segment import FLAGS, SegmentRequest
from segflow.errors import ConfigError
from segflow.segment import check_request, segment_region

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


def _segment_region(**options: Any) -> dict[str, Any]:
    """Segment ``image`` over the requested region with ``model``; write ``out`` and the rest.

    One parameter per option of :class:`segflow.config.segment.SegmentRequest` (same names
    and meaning as the command line's), so a deployment run can override any one of them.
    """
    request = SegmentRequest(**options)
    report = segment_task(request)  # segment_region checks the request before writing anything
    create_markdown_artifact(
        key="segment-region-summary",
        markdown=summary(report),
        description=f"segment_region of {request.image}",
    )
    return report


_segment_region.__signature__ = model_signature(SegmentRequest)  # type: ignore[attr-defined]
segment_region_flow = flow(name="segment_region", log_prints=False)(_segment_region)


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
    lines += [  # on a Dask cluster: each worker's share and throughput
        f"| worker `{w}` | {s['units']} units, {s['pixels'] / max(s['seconds'], 1e-9) / 1e6:.2f} Mpx/s |"
        for w, s in (inf.get("workers") or {}).items()
    ]
    if r.get("outputs", {}).get("quicklook"):
        lines += ["", f"![quick-look]({Path(r['outputs']['quicklook']).resolve().as_uri()})"]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line: one flag per option of SegmentRequest, and --tta [SET]."""
    p = argparse.ArgumentParser(
        prog="python flows/segment_region.py", description=__doc__.split("\n\n")[0]
    )
    add_options(p, SegmentRequest, skip=("tta_flips", "tta_set"), flags=FLAGS)
    p.add_argument(
        "--tta",
        nargs="?",
        const="auto",
        choices=("auto", "flips", "horizontal", "rot180"),
        help="flip test-time augmentation: auto (the default) averages over the flips the model "
        "was trained with; horizontal, rot180 or flips name them",
    )
    return p


def request_from_args(args: argparse.Namespace) -> SegmentRequest:
    """The request the flags ask for; no arguments at all: the demo's."""
    given = vars(args)
    if not {"image", "model", "out"} & given.keys():
        if not (DEMO_MODEL / "checkpoint.json").is_file():
            raise ConfigError(
                f"no demo model at {str(DEMO_MODEL)!r}: run `make demo` first, or pass --image, --model and --out"
            )
        DEMO_OUT.mkdir(parents=True, exist_ok=True)
        given.setdefault("polygons", str(DEMO_OUT / "segment_region.gpkg"))
        given.setdefault("quicklook", str(DEMO_OUT / "segment_region.png"))
        given.update(image=str(DEMO_IMAGE), model=str(DEMO_MODEL), out=str(DEMO_OUT / "segment_region.tif"))
    missing = [f"--{n}" for n in ("image", "model", "out") if n not in given]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}: give --image, --model and --out (or no arguments for the demo)"
        )
    tta = given.get("tta")
    return model_from_args(
        SegmentRequest,
        args,
        FLAGS,
        tta_flips=tta is not None,
        tta_set=None if tta in (None, "auto") else tta,
    )


def main(argv: list[str] | None = None) -> None:
    req = request_from_args(parser().parse_args(argv))
    check_request(req)  # fail in a second, before the flow starts
    with prefect_api():
        r = segment_region_flow(**req.model_dump())
    print(
        f"{req.out}: {r['region']['width']} x {r['region']['height']} px in {r['seconds']:.1f} s "
        f"(inference {r['inference']['seconds']:.1f} s, model forward {r['inference']['seconds_in_model']:.1f} s)"
    )
    for name, path in r["outputs"].items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    run_cli(main, flags=FLAGS)
