"""The pipeline's stages: what refuses a pipeline first (:mod:`~segflow.stages.checks`), when
each stage must run (:mod:`~segflow.stages.plan`: keys, plans and records) and what it does
then (:mod:`~segflow.stages.run`, :mod:`~segflow.stages.evaluate`,
:mod:`~segflow.stages.collection`); what ``flows/train.py`` builds before training
(:mod:`~segflow.stages.training`).

``flows/pipeline.py`` wraps :func:`~segflow.stages.run.run_ingest` and its siblings in
Prefect tasks; everything a stage decides lives here, with unit tests.
"""

from segflow.stages.checks import check_pipeline_inputs
from segflow.stages.evaluate import evaluate_request, plan_evaluate, run_evaluate
from segflow.stages.plan import (
    RECORD_VERSION,
    STAGE_CODE,
    StagePlan,
    StageRecord,
    StageRun,
    begin_stage,
    canonical_json,
    code_version,
    finish_stage,
    known_inputs,
    model_path,
    module_closure,
    outputs_exist,
    path_identity,
    plan_ingest,
    plan_prepare,
    plan_run,
    plan_segment,
    plan_stage,
    plan_train,
    read_record,
    read_started,
    record_path,
    stage_code,
    stage_key,
    started_path,
    write_record,
    write_started,
)
from segflow.stages.report import stage_status, summary
from segflow.stages.run import (
    finished_training,
    prediction_store_reusable,
    results_dir,
    run_ingest,
    run_prepare,
    run_segment,
    run_train,
    segment_request,
    skipped,
)
from segflow.stages.training import build_training_stores, store_ingest_config, training_config

__all__ = [
    "build_training_stores",
    "evaluate_request",
    "plan_evaluate",
    "run_evaluate",
    "store_ingest_config",
    "summary",
    "training_config",
    "RECORD_VERSION",
    "STAGE_CODE",
    "StagePlan",
    "StageRecord",
    "StageRun",
    "begin_stage",
    "canonical_json",
    "check_pipeline_inputs",
    "code_version",
    "finish_stage",
    "finished_training",
    "known_inputs",
    "model_path",
    "module_closure",
    "outputs_exist",
    "path_identity",
    "plan_ingest",
    "plan_prepare",
    "plan_run",
    "plan_segment",
    "plan_stage",
    "plan_train",
    "prediction_store_reusable",
    "results_dir",
    "read_record",
    "read_started",
    "record_path",
    "run_ingest",
    "run_prepare",
    "run_segment",
    "run_train",
    "segment_request",
    "skipped",
    "stage_status",
    "stage_code",
    "stage_key",
    "started_path",
    "write_record",
    "write_started",
]
