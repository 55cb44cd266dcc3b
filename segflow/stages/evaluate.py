"""The pipeline's evaluate stage: its prediction against ``evaluate.reference``.

Keyed by the segment_region stage (the prediction), the reference's content and the
``evaluate`` options; writes ``evaluation.json`` and ``evaluation.md`` in the work directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from segflow.config import PipelineConfig
from segflow.config.evaluate import EvaluateOptions, EvaluateRequest
from segflow.errors import options_named
from segflow.io import locations, remote
from segflow.stages.plan import (
    StagePlan,
    StageRun,
    _identity,
    begin_stage,
    finish_stage,
    known_inputs,
    plan_run,
    stage_code,
)
from segflow.stages.run import skipped

__all__ = ["evaluate_request", "plan_evaluate", "run_evaluate"]

#: The object metrics a stage result (and the pipeline summary) carries.
HEADLINE = ("precision", "recall", "f1", "ap_50", "ap_50_95", "pq")


def evaluate_request(cfg: PipelineConfig) -> EvaluateRequest:
    """The evaluation of the pipeline's ``prediction.tif`` that ``cfg.evaluate`` asks for."""
    assert cfg.evaluate is not None
    work = cfg.work_path
    return EvaluateRequest(
        **cfg.evaluate.model_dump(include=set(EvaluateOptions.model_fields)),
        prediction=str(locations.join(work, "prediction.tif")),
        out_json=str(locations.join(work, "evaluation.json")),
        out_markdown=str(locations.join(work, "evaluation.md")),
        overwrite=True,  # the pipeline's own names in its work directory
    )


def plan_evaluate(cfg: PipelineConfig, segment: StageRun) -> StageRun:
    """evaluate: the prediction (the segment_region key), the reference file, the options."""
    assert cfg.evaluate is not None
    work = cfg.work_path
    known = known_inputs(work, "evaluate")
    return plan_run(
        work,
        "evaluate",
        upstream={"segment_region": segment.key},
        params=cfg.evaluate.model_dump(mode="json", exclude={"reference"}),
        inputs={"reference": _identity(cfg.evaluate.reference, "reference", known)},
        code=stage_code("evaluate"),
    )


def run_evaluate(run: StageRun, cfg: PipelineConfig) -> dict[str, Any]:
    """Evaluate the pipeline's prediction; the headline metrics as the stage result."""
    if run.plan is StagePlan.SKIP:
        return skipped(run)
    t0 = time.perf_counter()
    req = evaluate_request(cfg)
    begin_stage(run)
    with options_named("yaml", prefix="evaluate."):
        report = _evaluate(req)
    objects = report["objects"]
    result = {
        "ran": True,
        "plan": run.plan.value,
        "seconds": round(time.perf_counter() - t0, 1),
        "outputs": {"json": req.out_json, "markdown": req.out_markdown},
        "mean_iou": report["pixels"]["mean_iou"],
        **{k: objects[k] for k in ("predicted", "reference", "tp", "fp", "fn", *HEADLINE)},
    }
    finish_stage(run, [str(req.out_json), str(req.out_markdown)], result)
    return result


def _evaluate(req: EvaluateRequest) -> dict[str, Any]:
    """:func:`~segflow.evaluation.evaluate`; reports bound for object storage are written
    locally and uploaded once both are complete."""
    from segflow.evaluation import evaluate

    urls = {
        k: getattr(req, k)
        for k in ("out_json", "out_markdown")
        if remote.is_url(getattr(req, k) or "")
    }
    if not urls:
        return evaluate(req)
    with tempfile.TemporaryDirectory(prefix="segflow-evaluate-") as tmp:
        local = {k: str(Path(tmp) / remote.ObjectURL.parse(url).name) for k, url in urls.items()}
        report = evaluate(req.model_copy(update=local))
        for name, url in urls.items():
            remote.upload(local[name], url)
    return report
