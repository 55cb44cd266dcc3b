"""Prefect flow: segment every scene of a collection with one model, then mosaic them.

    python flows/segment_collection.py --scenes 'tiles/*.tif' --model CKPT --out-dir OUT
        [--name '{stem}'] [--asset KEY ...] [--workers N | --dask-address ADDR]
        [--polygons] [--parquet] [--instances] [--tile 512] [--device cpu|cuda] [--overwrite]

Scenes are a glob, a text or CSV list, or a STAC ItemCollection. Each scene's outputs go to
OUT/NAME/ (what segment_region writes); a current scene is skipped, a half-done one resumes,
a failed one is reported with its reason while the others finish. OUT/summary.csv and
OUT/summary.parquet list every scene; OUT/mosaic.tif (and mosaic.gpkg / .parquet) cover the
georeferenced ones. Exit status 1 when any scene failed (they are named), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli, tqdm_progress
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while the scenes are listed
    warm_prefect_api()
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.config.cli import add_options, model_from_args, model_signature
from segflow.config.collection import COLLECTION_FLAGS, CollectionRequest
from segflow.stages.collection import (
    check_collection,
    collection_client,
    list_scenes,
    segment_collection,
    summary_rows,
)


@task(name="segment-collection", cache_policy=NO_CACHE)
def collection_task(req: CollectionRequest) -> dict[str, Any]:
    """The scenes (one Dask task each on a cluster), the summary and the mosaic."""
    bar = tqdm_progress(len(list_scenes(req)), "segment scenes")  # on a terminal only
    bar.unit = "scene"

    pixels = [0]  # of the scenes done or skipped so far

    def on_scene(result: Any) -> None:
        pixels[0] += result.pixels
        bar.set_postfix_str(f"{pixels[0] / 1e6:.1f} Mpx; {result.name}: {result.status}",
                            refresh=False)  # fmt: skip
        bar.update(1)

    with collection_client(req) as client:
        report = segment_collection(req, client=client, on_scene=on_scene)
    bar.close()
    return report.to_dict()


def _segment_collection(**options: Any) -> dict[str, Any]:
    """Segment every scene of ``scenes`` with ``model`` into ``out_dir``, then mosaic.

    One parameter per option of :class:`segflow.config.collection.CollectionRequest` (the
    command line's names), so a deployment run can override any one of them.
    """
    req = CollectionRequest(**options)
    report = collection_task(req)
    create_markdown_artifact(key="segment-collection-summary", markdown=summary(report),
                             description=f"segment_collection of {req.scenes}")  # fmt: skip
    return report


_segment_collection.__signature__ = model_signature(CollectionRequest)  # type: ignore[attr-defined]
segment_collection_flow = flow(name="segment_collection", log_prints=False)(_segment_collection)


def summary(r: dict[str, Any]) -> str:
    """A markdown table: one row per scene, then the collection's files."""
    from segflow.stages.collection import SceneResult

    rows = summary_rows(tuple(SceneResult(**s) for s in r["scenes"]))
    counts = r["counts"]
    lines = [
        "### segflow segment_collection",
        "",
        f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed in "
        f"{r['seconds']:.1f} s",
        "",
    ]
    if rows:
        cols = [c for c in rows[0] if c not in ("image", "out", "georeferenced")]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(row[c]) for c in cols) + " |" for row in rows]
    lines += ["", *(f"- {k}: `{v}`" for k, v in r["outputs"].items())]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value).replace("|", "/")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/segment_collection.py", description=__doc__.split("\n\n")[0]
    )
    add_options(p, CollectionRequest, skip=("tta_flips", "tta_set"), flags=COLLECTION_FLAGS)
    p.add_argument("--tta", nargs="?", const="auto", choices=("auto", "flips", "horizontal", "rot180"),
                   help="flip test-time augmentation (as segment_region's --tta)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tta = vars(args).pop("tta", None)
    req = model_from_args(CollectionRequest, args, COLLECTION_FLAGS, tta_flips=tta is not None,
                          tta_set=None if tta in (None, "auto") else tta)  # fmt: skip
    check_collection(req)  # bad input fails in a second, before the flow starts
    with prefect_api():
        r = segment_collection_flow(**req.model_dump())
    failed = [s for s in r["scenes"] if s["status"] == "failed"]
    c = r["counts"]
    print(f"{len(r['scenes'])} scenes: {c['done']} done, {c['skipped']} skipped, "
          f"{c['failed']} failed in {r['seconds']:.1f} s")  # fmt: skip
    for name, path in r["outputs"].items():
        print(f"  {name}: {path}")
    if failed:
        for s in failed:
            print(f"failed: {s['name']} ({s['image']}): {s['reason']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, flags=COLLECTION_FLAGS)
