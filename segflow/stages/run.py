"""The pipeline's stages, run: what each does once its plan (:mod:`segflow.stages.plan`) says
it must run, and what it records.

Every function takes the :class:`~segflow.stages.plan.StageRun` of its stage. A ``SKIP`` plan
returns the last run's result untouched (:func:`skipped`). Otherwise the stage records that it
started, cleans up after a ``FRESH`` plan (other inputs, options or code: never mix old and
new work), runs, and records its outputs and result (:func:`~segflow.stages.plan.finish_stage`).
A ``RESUME`` plan keeps the stage's partial work, which the stage itself resumes. The Prefect
tasks of ``flows/pipeline.py`` only wrap these functions.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segflow.cluster import dask_client
from segflow.config.segment import InstanceOptions, SegmentOptions, SegmentRequest
from segflow.errors import options_named
from segflow.io import locations, remote
from segflow.stages.plan import StagePlan, StageRun, begin_stage, finish_stage

if TYPE_CHECKING:
    from segflow.config import PipelineConfig
    from segflow.config.train import TrainConfig

__all__ = [
    "finished_training",
    "prediction_store_reusable",
    "run_ingest",
    "run_prepare",
    "run_segment",
    "run_train",
    "segment_request",
    "skipped",
]

#: Request parameters that define the region segment_region predicts.
REGION_PARAMS = ("image", "bbox", "bbox_crs", "window")


#: Prefect's stage results (the pipeline's cache), in a local work directory
RESULTS_DIR = ".prefect-results"


def results_dir(work: str | Path) -> Path:
    """Where the pipeline's Prefect results go (a local directory): ``RESULTS_DIR`` in a
    local work directory; for one on object storage, a folder of segflow's cache named by it."""
    if not remote.is_url(work):
        return Path(work).resolve() / RESULTS_DIR
    return locations.cache_root() / "prefect-results" / sha256(str(work).encode()).hexdigest()[:24]


def skipped(run: StageRun) -> dict[str, Any]:
    """What a current stage reports: its last run's result, not run now."""
    return {**(run.previous.result if run.previous else {}), "ran": False, "plan": run.plan.value}


def run_ingest(
    run: StageRun, cfg: PipelineConfig, store: str, *, dask_address: str | None
) -> dict[str, Any]:
    """Ingest ``cfg.ingest`` into ``store`` on a Dask client (``dask_address`` or embedded)."""
    from segflow.ingest import IngestSpec, ingest
    from segflow.io.store import remove_store, staging_location

    if run.plan is StagePlan.SKIP:
        return skipped(run)
    t0 = time.perf_counter()
    begin_stage(run)
    if run.plan is StagePlan.FRESH:  # other inputs, options or code: never mix two stores
        remove_store(store)
        remove_store(staging_location(store))
    spec = IngestSpec.from_config(
        cfg.ingest, out=store, classes=cfg.classes, ignore_index=cfg.ignore_index
    )
    with dask_client(dask_address) as client:
        r = ingest(spec, executor=client.get_executor())
    result = {
        "ran": not r.already_complete,
        "plan": run.plan.value,
        "seconds": round(time.perf_counter() - t0, 1),
        "units": r.units_written,
    }
    finish_stage(run, [store], result)
    return result


def run_prepare(
    run: StageRun, cfg: PipelineConfig, store: str, *, dask_address: str | None
) -> dict[str, Any]:
    """Weights, fingerprint and class weights of ``store`` (``cfg.prepare``)."""
    from segflow.io.store import SceneStore
    from segflow.prepare import default_fingerprint_path, is_current, prepare_store

    if run.plan is StagePlan.SKIP:
        return skipped(run)
    t0 = time.perf_counter()
    begin_stage(run)
    # resuming: the store's own records say what is done; fresh: recompute everything
    # (the key may have changed for the code alone, which the store's records do not see)
    force = run.plan is StagePlan.FRESH
    ran = force or not is_current(SceneStore.open(store), cfg.prepare)
    if ran:
        with dask_client(dask_address) as client:
            res = prepare_store(store, cfg.prepare, client=client, force=force)
        fingerprint = str(res.fingerprint_path)
    else:
        fingerprint = str(default_fingerprint_path(store))
    result = {"ran": ran, "plan": run.plan.value, "seconds": round(time.perf_counter() - t0, 1)}
    finish_stage(run, [fingerprint, str(locations.join(store, "weights"))], result)
    return result


def finished_training(out: Path, tcfg: TrainConfig) -> bool:
    """A finished run of this exact training config is in ``out`` (its ``last`` checkpoint
    is written once training ends; ``best`` also exists part-way)."""
    ckpt = out / "last" / "checkpoint.json"
    if not ckpt.is_file():
        return False
    doc = json.loads(ckpt.read_text())
    return bool(doc.get("training", {}).get("config") == tcfg.model_dump(mode="json"))


def run_train(
    run: StageRun, cfg: PipelineConfig, out: str, *, device: str | None
) -> dict[str, Any]:
    """Train ``cfg.train`` into ``out``, resuming its training state when there is one.

    An ``out`` on object storage is trained into a local mirror of it
    (:func:`~segflow.io.locations.local_mirror`), uploaded as training ends or fails.
    """
    if run.plan is StagePlan.SKIP:
        return skipped(run)
    t0 = time.perf_counter()
    begin_stage(run)
    tcfg = cfg.train
    if tcfg is None:
        raise ValueError("run_train needs a pipeline with a train section")
    if run.plan is StagePlan.FRESH:  # inputs, config or code changed: a new run, not a resume
        locations.remove(out)
        if remote.is_url(out):
            locations.forget_mirror(out, cache=locations.cache_root())
    with contextlib.ExitStack() as stack:
        local = (
            stack.enter_context(locations.local_mirror(out, cache=locations.cache_root()))
            if remote.is_url(out)
            else Path(out)
        )
        # each resumable state goes up as it is saved: a run killed here resumes elsewhere
        upload = (lambda _step: locations.sync_up(local, out)) if remote.is_url(out) else None
        result = _train_into(local, tcfg, device=device, plan=run.plan, on_state_saved=upload)
        written = [n for n in ("best", "last", "metrics.json") if (local / n).exists()]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    finish_stage(run, [str(locations.join(out, n)) for n in written], result)
    return result


def _train_into(
    out: Path,
    tcfg: TrainConfig,
    *,
    device: str | None,
    plan: StagePlan,
    on_state_saved: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Train into the local ``out``: resumed from its state, or nothing to do when a run
    killed before it was recorded finished there."""
    from segflow.train.loop import STATE_DIR, train

    if finished_training(out, tcfg):
        return {"ran": False, "plan": plan.value}
    resume = (out / STATE_DIR).is_dir() or (out / f"{STATE_DIR}.old").is_dir()
    res = train(tcfg, out_dir=out, device=device, resume=resume, on_state_saved=on_state_saved)
    return {
        "ran": True,
        "plan": plan.value,
        "steps": res.steps,
        "best_metric": res.best_metric,
        "metric": tcfg.select_metric,
        "resumed_from": res.resumed_from,
    }


def segment_request(
    cfg: PipelineConfig, model: str, device: str | None, dask_address: str | None = None
) -> SegmentRequest:
    """The segment_region request of a pipeline: ``cfg.segment`` with its outputs in the
    work directory (``prediction.tif``, and the other files the section asks for)."""
    s = cfg.segment
    return SegmentRequest(
        **s.model_dump(include=set(SegmentOptions.model_fields)),
        # the instance options count only with the instance output
        **(s.model_dump(include=set(InstanceOptions.model_fields)) if s.instances else {}),
        **s.output_paths(cfg.work_path),  # type: ignore[arg-type]
        image=s.image or cfg.ingest.source,
        assets=() if s.image else cfg.ingest.assets,
        # the model was trained at ingest.level: read the ingested source at that scale
        level=s.level if s.level is not None else (0 if s.image else cfg.ingest.level),
        model=model,
        device=device,
        dask_address=dask_address,  # inference on that cluster's workers (None: here)
        # these names in work_dir are the pipeline's own: an earlier run's (whose record went
        # with a rebuilt inference store) are replaced, not refused
        overwrite=True,
    )


def prediction_store_reusable(run: StageRun) -> bool:
    """Whether a fresh segment_region run may keep the prediction store of the last start.

    The store resumes by itself the units made with the same model and inference options (an
    export option alone re-infers nothing), but units made by other code or for another
    region must not be mixed in: then it is rebuilt.
    """
    before = run.started or {}
    params = before.get("params") or {}
    same_region = all(params.get(k) == (run.params or {}).get(k) for k in REGION_PARAMS)
    return before.get("code") == run.code and same_region


def run_segment(
    run: StageRun,
    cfg: PipelineConfig,
    model: str,
    *,
    device: str | None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """segment_region over ``cfg.segment`` with the checkpoint ``model``."""
    from segflow.io.store import remove_store, staging_location
    from segflow.outputs import remove_output
    from segflow.segment import segment_region

    if run.plan is StagePlan.SKIP:
        return skipped(run)
    t0 = time.perf_counter()
    req = segment_request(cfg, model, device, dask_address)
    begin_stage(run)
    if run.plan is StagePlan.FRESH:
        for old in run.previous.outputs if run.previous else ():
            # e.g. polygons no longer asked for; with its .aux.xml
            if remote.is_url(old):
                for name in (old, f"{old}.aux.xml"):
                    locations.remove(name)
            else:
                remove_output(old)
        if not prediction_store_reusable(run):
            for where in {req.work_store, staging_location(req.work_store)}:
                remove_store(where)
    with options_named("yaml", prefix="segment."):  # the user wrote the YAML section
        r = segment_region(req).to_dict()
    result = {
        "ran": True,
        "plan": run.plan.value,
        "seconds": round(time.perf_counter() - t0, 1),
        "outputs": r["outputs"],
        "class_pixels": r["class_pixels"],
        "tiles": r["inference"]["tiles"],
        "skipped_units": r["inference"]["skipped_units"],
    }
    finish_stage(run, list(r["outputs"].values()), result)
    return result
