"""Prefect flow: evaluate a prediction against reference labels (pixel and object metrics).

    python flows/evaluate.py --prediction OUT.tif --reference LABELS
        [--reference-kind auto|classes|instances] [--reference-class 1] [--class-column class_id]
        [--object-classes ID ...] [--iou 0.5] [--window COL ROW WIDTH HEIGHT | --bbox ...]
        [--out-json REPORT.json] [--out-markdown REPORT.md] [--overwrite] [--debug]

The prediction is segment_region's class COG, its prediction store or polygons; the reference
a class raster, an instance raster or polygons. Pixel metrics from one confusion matrix;
objects matched by IoU: precision, recall, F1, average precision over IoU 0.5:0.95, panoptic
quality, and the touching reference objects the prediction separates. Streams over windows:
a gigapixel evaluation runs in bounded memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while the command loads
    warm_prefect_api()
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.config.cli import add_options, model_from_args, model_signature
from segflow.config.evaluate import EvaluateRequest
from segflow.evaluation import check_request, evaluate, report_markdown


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(req: EvaluateRequest) -> dict[str, Any]:
    """One task: the windows are streamed inside it."""
    return evaluate(req)


def _evaluate(**options: Any) -> dict[str, Any]:
    """Evaluate ``prediction`` against ``reference``; one parameter per option of
    :class:`segflow.config.evaluate.EvaluateRequest` (the command line's names)."""
    request = EvaluateRequest(**options)
    report = evaluate_task(request)
    create_markdown_artifact(
        key="evaluate-report",
        markdown=report_markdown(report),
        description=f"{request.prediction} against {request.reference}",
    )
    return report


_evaluate.__signature__ = model_signature(EvaluateRequest)  # type: ignore[attr-defined]
evaluate_flow = flow(name="evaluate", log_prints=False)(_evaluate)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/evaluate.py", description=__doc__.split("\n\n")[0]
    )
    add_options(p, EvaluateRequest)
    return p


def main(argv: list[str] | None = None) -> None:
    req = model_from_args(EvaluateRequest, parser().parse_args(argv))
    check_request(req)  # fail in a second, before Prefect starts
    with prefect_api():
        r = evaluate_flow(**req.model_dump())
    px, ob = r["pixels"], r["objects"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{req.prediction} vs {req.reference} ({r['seconds']:.1f} s)")
    print(f"  pixels: accuracy {f(px['pixel_accuracy'])}, mean IoU {f(px['mean_iou'])}")
    print(
        f"  objects: {ob['predicted']} predicted, {ob['reference']} reference; at IoU >= "
        f"{ob['iou_threshold']}: precision {f(ob['precision'])}, recall {f(ob['recall'])}, "
        f"F1 {f(ob['f1'])}; AP 0.5:0.95 {f(ob['ap_50_95'])}; PQ {f(ob['pq'])}"
    )
    print(
        f"  touching reference pairs separated: {ob['touching_pairs_separated']} of {ob['touching_pairs']}"
    )
    for name in ("out_json", "out_markdown"):
        if getattr(req, name):
            print(f"  {name}: {getattr(req, name)}")


if __name__ == "__main__":
    run_cli(main)
