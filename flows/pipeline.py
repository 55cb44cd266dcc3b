"""Prefect flow: the whole pipeline of one config, ingest -> prepare -> train -> segment_region.

    python flows/pipeline.py pipelines/NAME.yaml [--dask-address ADDR] [--device cpu|cuda]

Outputs go to the config's ``work_dir`` (default ``outputs/NAME``): the scene store, the
fingerprint, the checkpoint and training curve (``train/``), the COG, polygons and quick-look.
A stage whose inputs, parameters and code are unchanged is skipped (each stage records what
it was made from), so re-running finishes in seconds; a changed parameter re-runs that stage
and the ones after it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/_common.py
from _common import run_cli
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from segflow.cluster import dask_client
from segflow.config import PipelineConfig, load_config
from segflow.errors import ConfigError


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_stage(cfg: PipelineConfig, store: str, dask_address: str | None) -> dict[str, Any]:
    from segflow.ingest import IngestSpec, ingest

    spec = IngestSpec.from_config(
        cfg.ingest, out=store, classes=cfg.classes, ignore_index=cfg.ignore_index
    )
    with dask_client(dask_address) as client:
        r = ingest(spec, executor=client.get_executor())
    return {"ran": not r.already_complete, "seconds": round(r.seconds, 1), "units": r.units_written}


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_stage(cfg: PipelineConfig, store: str, dask_address: str | None) -> dict[str, Any]:
    from segflow.io.store import SceneStore
    from segflow.prepare import is_current, prepare_store

    if is_current(SceneStore.open(store), cfg.prepare):
        return {"ran": False}
    t0 = time.perf_counter()
    with dask_client(dask_address) as client:
        prepare_store(store, cfg.prepare, client=client)
    return {"ran": True, "seconds": round(time.perf_counter() - t0, 1)}


def _trained(out: Path, tcfg: Any) -> bool:
    """A finished run of this exact training config is in ``out``."""
    ckpt = out / "best" / "checkpoint.json"
    if not ckpt.is_file():
        return False
    doc = json.loads(ckpt.read_text())
    return bool(doc.get("training", {}).get("config") == tcfg.model_dump(mode="json"))


@task(name="train", cache_policy=NO_CACHE)
def train_stage(
    cfg: PipelineConfig, out: str, upstream_changed: bool, device: str | None
) -> dict[str, Any]:
    import shutil

    from segflow.train.config import make_train_config
    from segflow.train.loop import train

    tcfg = make_train_config(cfg.train or {}, source="train")
    if not upstream_changed and _trained(Path(out), tcfg):
        return {"ran": False}
    if Path(out).exists():
        shutil.rmtree(out)  # inputs or config changed: a new run, not a resume of the old one
    res = train(tcfg, out_dir=out, device=device)
    return {
        "ran": True,
        "seconds": round(res.wall_s, 1),
        "steps": res.steps,
        "best_metric": res.best_metric,
        "metric": tcfg.select_metric,
    }


@task(name="segment_region", cache_policy=NO_CACHE)
def segment_stage(cfg: PipelineConfig, model: str, device: str | None) -> dict[str, Any]:
    from segflow.segment import SegmentRequest, segment_region

    s, work = cfg.segment, cfg.work_path
    req = SegmentRequest(
        image=s.image or cfg.ingest.source,
        model=s.model or model,
        out=str(work / "prediction.tif"),
        bbox=s.bbox,
        bbox_crs=s.bbox_crs,
        window=s.window,
        tile=s.tile,
        mode=s.mode,
        overlap=s.overlap,
        batch_size=s.batch_size,
        tta_flips=s.tta_flips,
        device=device,
        polygons=str(work / "prediction.gpkg") if s.polygons else None,
        parquet=str(work / "prediction.parquet") if s.parquet else None,
        probabilities=str(work / "probabilities.tif") if s.probabilities else None,
        quicklook=str(work / "quicklook.png") if s.quicklook else None,
        ome_tiff=str(work / "prediction.ome.tif") if s.ome_tiff else None,
        qupath_geojson=str(work / "prediction.qupath.geojson") if s.qupath else None,
    )
    r = segment_region(req).to_dict()
    return {
        "ran": True,
        "seconds": round(r["seconds"], 1),
        "outputs": r["outputs"],
        "class_pixels": r["class_pixels"],
        "tiles": r["inference"]["tiles"],
        "skipped_units": r["inference"]["skipped_units"],
    }


@flow(name="pipeline", log_prints=False)
def pipeline_flow(
    config_path: str, dask_address: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Run every stage of ``config_path`` that is not already current."""
    cfg = load_config(config_path)
    work = cfg.work_path
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "scene.zarr")
    stages: dict[str, Any] = {}
    stages["ingest"] = ingest_stage(cfg, store, dask_address)
    stages["prepare"] = prepare_stage(cfg, store, dask_address)
    model = str(work / "train")
    if cfg.train is not None:
        changed = stages["ingest"]["ran"] or stages["prepare"]["ran"]
        stages["train"] = train_stage(cfg, model, changed, device)
    stages["segment_region"] = segment_stage(cfg, str(Path(model) / "best"), device)
    create_markdown_artifact(
        key="pipeline-summary", markdown=summary(cfg, stages), description=f"pipeline {cfg.name}"
    )
    return stages


def summary(cfg: PipelineConfig, stages: dict[str, Any]) -> str:
    lines = [f"### segflow pipeline `{cfg.name}`", "", "| stage | status |", "|---|---|"]
    for name, st in stages.items():
        status = f"ran in {st.get('seconds', '?')} s" if st["ran"] else "skipped (current)"
        if name == "train" and st["ran"]:
            status += f", {st['steps']} steps, best {st['metric']} {st['best_metric']:.4f}"
        lines.append(f"| {name} | {status} |")
    seg = stages["segment_region"]
    outputs = dict(seg["outputs"])
    if "train" in stages:
        outputs["training curve"] = str(cfg.work_path / "train" / "curve.png")
        outputs["model"] = str(cfg.work_path / "train" / "best")
    lines += ["", *[f"- {k}: `{v}`" for k, v in outputs.items()]]
    lines += [f"- {k}: {v} px" for k, v in seg["class_pixels"].items()]
    return "\n".join(lines) + "\n"


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
    if not Path(cfg.ingest.source).exists():
        raise ConfigError(
            f"ingest.source not found: {cfg.ingest.source!r} (paths are relative to the working directory)"
        )
    stages = pipeline_flow(args.config, args.dask_address, args.device)
    print(summary(cfg, stages))


if __name__ == "__main__":
    run_cli(main)
