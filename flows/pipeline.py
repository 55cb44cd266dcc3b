"""Prefect flow: the whole pipeline of one config, ingest -> prepare -> train -> segment_region
(-> evaluate, -> segment_collection, with those sections).

    python flows/pipeline.py pipelines/NAME.yaml [--dask-address ADDR] [--device cpu|cuda]

Outputs go to the config's ``work_dir`` (default ``outputs/NAME``): the scene store, the
fingerprint, the checkpoint and training curve (``train/``), the COG, polygons and quick-look,
and a ``collection/`` of more scenes.

Each stage has a key (:mod:`segflow.stages`: upstream keys, parameters, input contents,
code); a stage whose key and outputs match its record in ``<work>/stages/`` is skipped, one
killed part-way resumes its own work, and one with another key starts clean. Prefect's cache
(``cache_key_fn`` = the stage key) shows a current stage as Cached; the stage records stay the
source of truth: the cache is refreshed whenever they say a stage must run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from _warm_api import prefect_api, warm_prefect_api

if __name__ == "__main__":  # Prefect's API server comes up while the command loads
    warm_prefect_api()
from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact

from segflow.config import PipelineConfig, load_config
from segflow.io import locations
from segflow.stages import (
    StagePlan,
    StageRun,
    check_pipeline_inputs,
    model_path,
    plan_evaluate,
    plan_ingest,
    plan_prepare,
    plan_segment,
    plan_train,
    results_dir,
    run_evaluate,
    run_ingest,
    run_prepare,
    run_segment,
    run_train,
    summary,
)
from segflow.stages.collection import plan_collection, run_collection


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    run: StageRun = parameters["run"]
    return run.cache_key


_STAGE = dict(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")


@task(name="ingest", **_STAGE)  # type: ignore[call-overload]
def ingest_stage(
    run: StageRun, cfg: PipelineConfig, store: str, dask_address: str | None
) -> dict[str, Any]:
    return run_ingest(run, cfg, store, dask_address=dask_address)


@task(name="prepare", **_STAGE)  # type: ignore[call-overload]
def prepare_stage(
    run: StageRun, cfg: PipelineConfig, store: str, dask_address: str | None
) -> dict[str, Any]:
    return run_prepare(run, cfg, store, dask_address=dask_address)


@task(name="train", **_STAGE)  # type: ignore[call-overload]
def train_stage(run: StageRun, cfg: PipelineConfig, out: str, device: str | None) -> dict[str, Any]:
    return run_train(run, cfg, out, device=device)


@task(name="segment_region", **_STAGE)  # type: ignore[call-overload]
def segment_stage(
    run: StageRun, cfg: PipelineConfig, model: str, device: str | None, dask_address: str | None
) -> dict[str, Any]:
    return run_segment(run, cfg, model, device=device, dask_address=dask_address)


@task(name="evaluate", **_STAGE)  # type: ignore[call-overload]
def evaluate_stage(run: StageRun, cfg: PipelineConfig) -> dict[str, Any]:
    return run_evaluate(run, cfg)


@task(name="segment_collection", **_STAGE)  # type: ignore[call-overload]
def collection_stage(run: StageRun, cfg: PipelineConfig, device: str | None,
                     dask_address: str | None) -> dict[str, Any]:  # fmt: skip
    return run_collection(run, cfg, device=device, dask_address=dask_address)


def _call(stage: Task[..., dict[str, Any]], run: StageRun, *args: Any) -> dict[str, Any]:
    """Run one stage task: Prefect's cache answers only when the stage records say current."""
    configured: Callable[..., dict[str, Any]] = stage.with_options(
        result_storage=results_dir(run.work),
        refresh_cache=run.plan is not StagePlan.SKIP,
    )
    result = dict(configured(run, *args))
    if run.plan is StagePlan.SKIP:  # a cached result is the one of the run that made it
        result.update(ran=False, plan=run.plan.value)
    return result


@flow(name="pipeline", log_prints=False)
def pipeline_flow(
    config_path: str, dask_address: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Run every stage of ``config_path`` that is not already current."""
    cfg = load_config(config_path)
    work = cfg.work_path
    if isinstance(work, Path):
        work.mkdir(parents=True, exist_ok=True)
    store = str(locations.join(work, "scene.zarr"))
    stages: dict[str, Any] = {}
    ingest = plan_ingest(cfg)
    stages["ingest"] = _call(ingest_stage, ingest, cfg, store, dask_address)
    prepare = plan_prepare(cfg, ingest)
    stages["prepare"] = _call(prepare_stage, prepare, cfg, store, dask_address)
    train = None
    if cfg.train is not None:
        train = plan_train(cfg, store, ingest, prepare)
        stages["train"] = _call(train_stage, train, cfg, str(locations.join(work, "train")), device)
    segment = plan_segment(cfg, store, ingest, prepare, train)  # after training: keys the model
    stages["segment_region"] = _call(
        segment_stage, segment, cfg, str(model_path(cfg)), device, dask_address
    )
    if cfg.evaluate is not None:
        stages["evaluate"] = _call(evaluate_stage, plan_evaluate(cfg, segment), cfg)
    if cfg.collection is not None:
        stages["segment_collection"] = _call(collection_stage, plan_collection(cfg, train), cfg,
                                             device, dask_address)  # fmt: skip
    create_markdown_artifact(
        key="pipeline-summary", markdown=summary(cfg, stages), description=f"pipeline {cfg.name}"
    )
    return stages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python flows/pipeline.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("config", help="pipelines/NAME.yaml")
    ap.add_argument(
        "--dask-address", help="Dask scheduler (default: $SEGFLOW_DASK_ADDRESS or a local cluster)"
    )
    ap.add_argument("--device", help="training and inference device (default: CUDA when available)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)  # fail fast, before Prefect starts
    check_pipeline_inputs(cfg)
    with prefect_api():
        stages = pipeline_flow(args.config, args.dask_address, args.device)
    print(summary(cfg, stages))


if __name__ == "__main__":
    run_cli(main)
