"""The pipeline's stage decisions (segflow.stages.run), unit by unit, without running a stage.

The flows only wrap these functions; the end-to-end behaviour (skips, re-runs, resumes) is
tested in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from segflow.config import PipelineConfig
from segflow.config.train import StoreRef, TrainConfig
from segflow.errors import ConfigError
from segflow.stages import (
    StagePlan,
    StageRecord,
    StageRun,
    finished_training,
    prediction_store_reusable,
    read_started,
    run_segment,
    segment_request,
    skipped,
    store_ingest_config,
    training_config,
)

ISBI = {"source": "data/samples/isbi2012/train/images/0.png"}
TRAIN = {
    "stores": {"train": ["a.zarr"]},
    "model": {"arch": "unet", "in_channels": 1, "out_channels": 2, "features": 4, "depth": 2},
    "steps": 2,
    "patch": 32,
    "batch_size": 1,
}


def pipeline(tmp_path: Path, **segment: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"name": "t", "work_dir": str(tmp_path / "w"), "ingest": {**ISBI, "level": 1},
         "segment": segment}
    )  # fmt: skip


def run_of(plan: StagePlan, *, code: str = "c1", params: dict | None = None,
           started: dict | None = None, previous: StageRecord | None = None,
           work: str = ".") -> StageRun:  # fmt: skip
    return StageRun(stage="segment_region", key="k", plan=plan, work=work, code=code,
                    params=params or {}, started=started, previous=previous)  # fmt: skip


def test_segment_request_of_a_pipeline(tmp_path: Path) -> None:
    work = tmp_path / "w"
    req = segment_request(pipeline(tmp_path), "m", None)
    assert (req.image, req.level, req.model) == (ISBI["source"], 1, "m")  # ingest's level
    assert req.out == str(work / "prediction.tif") and req.overwrite
    assert req.polygons == str(work / "prediction.gpkg")
    assert req.quicklook == str(work / "quicklook.png") and req.probabilities is None
    assert req.work_store == work / "prediction.predictions.zarr"
    other = segment_request(
        pipeline(tmp_path, image="b.tif", tile=256, polygons=False, quicklook=False), "m", "cpu"
    )
    assert (other.image, other.level, other.tile, other.device) == ("b.tif", 0, 256, "cpu")
    assert other.polygons is None and other.quicklook is None
    assert segment_request(pipeline(tmp_path, image="b.tif", level=2), "m", None).level == 2


@pytest.mark.parametrize(
    ("started", "code", "params", "reusable"),
    [
        ({"code": "c1", "params": {"image": "a.tif", "tile": 256}}, "c1",
         {"image": "a.tif", "tile": 512}, True),  # only an inference option changed
        ({"code": "c0", "params": {"image": "a.tif"}}, "c1", {"image": "a.tif"}, False),
        ({"code": "c1", "params": {"image": "a.tif"}}, "c1", {"image": "b.tif"}, False),
        ({"code": "c1", "params": {"bbox": [0, 0, 1, 1]}}, "c1", {"bbox": [0, 0, 2, 2]}, False),
        ({"code": "c1", "params": {"window": None}}, "c1", {"window": [0, 0, 8, 8]}, False),
        (None, "c1", {"image": "a.tif"}, False),  # nothing started: nothing to keep
    ],
)  # fmt: skip
def test_prediction_store_is_kept_only_for_the_same_code_and_region(
    started: dict | None, code: str, params: dict, reusable: bool
) -> None:
    run = run_of(StagePlan.FRESH, code=code, params=params, started=started)
    assert prediction_store_reusable(run) is reusable


def test_finished_training_needs_the_same_config_in_last(tmp_path: Path) -> None:
    tcfg = TrainConfig.model_validate(TRAIN)
    assert not finished_training(tmp_path, tcfg)
    (tmp_path / "last").mkdir()
    doc = {"training": {"config": tcfg.model_dump(mode="json")}}
    (tmp_path / "last" / "checkpoint.json").write_text(json.dumps(doc))
    assert finished_training(tmp_path, tcfg)
    other = TrainConfig.model_validate({**TRAIN, "steps": 3})
    assert not finished_training(tmp_path, other)


def test_a_current_stage_reports_its_last_result_and_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segflow.segment

    def boom(*_: Any, **__: Any) -> None:
        raise AssertionError("a skipped stage ran")

    monkeypatch.setattr(segflow.segment, "segment_region", boom)
    previous = StageRecord(stage="segment_region", key="k", result={"ran": True, "tiles": 4})
    run = run_of(StagePlan.SKIP, previous=previous, work=str(tmp_path))
    assert skipped(run) == {"ran": False, "tiles": 4, "plan": "skip"}
    assert run_segment(run, pipeline(tmp_path), "m", device=None) == skipped(run)
    assert read_started(tmp_path, "segment_region") is None  # nothing recorded either


@pytest.mark.parametrize("same_region", [True, False])
def test_a_fresh_segment_run_cleans_up_what_it_must(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_region: bool
) -> None:
    """Old outputs go; the prediction store stays only when :func:`prediction_store_reusable`."""
    import segflow.segment

    cfg = pipeline(tmp_path)
    work = cfg.work_path
    store = work / "prediction.predictions.zarr"
    old = work / "old.gpkg"
    store.mkdir(parents=True)
    old.write_text("x")
    seen: dict[str, bool] = {}

    class Report:
        def to_dict(self) -> dict[str, Any]:
            return {"outputs": {}, "class_pixels": {}, "inference": {"tiles": 0,
                    "skipped_units": 0}}  # fmt: skip

    def fake(req: Any) -> Report:
        seen["store kept"] = store.exists()
        return Report()

    monkeypatch.setattr(segflow.segment, "segment_region", fake)
    params = {"image": ISBI["source"], "tile": 512}
    started = {"code": "c1", "params": params if same_region else {**params, "image": "x"}}
    previous = StageRecord(stage="segment_region", key="old", outputs=(str(old),))
    run = run_of(StagePlan.FRESH, params=params, started=started, previous=previous,
                 work=str(work))  # fmt: skip
    result = run_segment(run, cfg, "m", device=None)
    assert result["ran"] and result["plan"] == "fresh"
    assert not old.exists()
    assert seen["store kept"] is same_region


def test_a_segment_stage_error_names_the_yaml_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A region outside the image, asked for in the pipeline YAML, is named as written there."""
    import segflow.segment
    from segflow.errors import RegionError
    from segflow.region import resolve_region

    def fake(req: Any) -> None:
        resolve_region(height=512, width=512, window=req.window)

    monkeypatch.setattr(segflow.segment, "segment_region", fake)
    cfg = pipeline(tmp_path, window=[600, 0, 10, 10])
    with pytest.raises(RegionError, match=r"region segment\.window: \[600, 0, 10, 10\] lies"):
        run_segment(run_of(StagePlan.FRESH, work=str(cfg.work_path)), cfg, "m", device=None)


# --------------------------------------------------------------------------- flows/train.py
def test_training_config_takes_the_pipeline_classes_and_the_overrides(tmp_path: Path) -> None:
    classes = [{"id": 0, "name": "membrane"}, {"id": 1, "name": "cell"}]
    cfg = PipelineConfig.model_validate(
        {"name": "t", "ingest": ISBI, "classes": classes, "train": TRAIN}
    )
    assert cfg.train is not None and cfg.train.classes is None  # validated with the file
    tcfg = training_config(cfg)
    assert tcfg.classes == cfg.classes and tcfg.steps == 2
    over = training_config(cfg, steps=7, time_limit_s=30.0)
    assert (over.steps, over.epochs, over.time_limit_s) == (7, None, 30.0)
    own = {**TRAIN, "classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
    mine = PipelineConfig.model_validate({"name": "t", "ingest": ISBI, "train": own})
    assert training_config(mine) is mine.train  # nothing to change: the validated section
    with pytest.raises(ConfigError, match=r"p\.yaml: no 'train' section"):
        training_config(pipeline(tmp_path), source="p.yaml")
    with pytest.raises(ConfigError, match=r"p\.yaml: train"):
        training_config(cfg, steps=0, source="p.yaml")


def test_a_listed_store_is_ingested_like_the_template_but_with_its_own_image() -> None:
    ingest = {**ISBI, "labels": "l0.png", "instances": "i0.png", "chunk": 256}
    cfg = PipelineConfig.model_validate({"name": "t", "ingest": ingest})
    own = store_ingest_config(cfg, StoreRef(store="a.zarr", source=ISBI["source"], labels="l.png"))
    assert (own.source, own.labels, own.instances, own.chunk) == (
        ISBI["source"], "l.png", "i0.png", 256)  # fmt: skip
    other = store_ingest_config(cfg, StoreRef(store="b.zarr", source="b.png", labels="lb.png"))
    assert (other.source, other.labels, other.instances) == ("b.png", "lb.png", None)
    # a store's own instance raster (touching nuclei that class labels cannot separate)
    ref = StoreRef(store="d.zarr", source="d.png", labels="ld.png", instances="id.png")
    assert store_ingest_config(cfg, ref).instances == "id.png"
    with pytest.raises(ValueError, match="no source"):
        store_ingest_config(cfg, StoreRef(store="c.zarr"))


def test_the_summary_says_what_each_stage_did(tmp_path: Path) -> None:
    from segflow.stages import check_pipeline_inputs, stage_status, summary

    cfg = pipeline(tmp_path)
    stages = {
        "ingest": {"ran": False},
        "prepare": {"ran": True, "seconds": 2.5, "plan": "resume"},
        "train": {"ran": True, "seconds": 9, "plan": "fresh", "steps": 40, "metric": "mean_iou",
                  "best_metric": 0.71234},
        "segment_region": {"ran": True, "seconds": 1, "plan": "fresh",
                           "outputs": {"out": "p.tif"}, "class_pixels": {"cell": 12}},
    }  # fmt: skip
    assert stage_status("ingest", stages["ingest"]) == "skipped (current)"
    assert stage_status("prepare", stages["prepare"]) == "ran in 2.5 s (resumed)"
    assert stage_status("train", stages["train"]) == "ran in 9 s, 40 steps, best mean_iou 0.7123"
    text = summary(cfg, stages)
    assert "| segment_region | ran in 1 s |" in text and "- out: `p.tif`" in text
    assert "- cell: 12 px" in text and "- model: `" in text
    missing = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"source": "no.tif"})})
    with pytest.raises(ConfigError, match=r"ingest\.source not found: 'no\.tif'"):
        check_pipeline_inputs(missing)


# --------------------------------------------------------------------------- collection
def test_a_collection_section_is_checked_first_and_a_failed_scene_keeps_it_unrecorded(
    tmp_path: Path,
) -> None:
    """A glob naming no image is refused before anything runs (named as in the YAML); a
    collection with a failed scene raises one line naming it and records no stage, so the
    next run tries it again. The section's model defaults to the pipeline's."""
    from segflow.errors import SegflowError
    from segflow.stages import check_pipeline_inputs, read_record
    from segflow.stages.collection import collection_request, plan_collection, run_collection

    def with_collection(**section: Any) -> PipelineConfig:
        base = pipeline(tmp_path).model_dump(exclude={"collection"})
        base["ingest"]["source"] = str(Path(__file__).resolve().parents[1] / ISBI["source"])
        return PipelineConfig.model_validate({**base, "collection": section})

    cfg = with_collection(scenes=str(tmp_path / "none" / "*.tif"))
    with pytest.raises(ConfigError, match=r"collection\.scenes: .* names no image"):
        check_pipeline_inputs(cfg)
    req = collection_request(cfg, device="cpu")
    assert req.model == str(tmp_path / "w" / "train" / "best")
    assert req.out_dir == str(tmp_path / "w" / "collection") and req.overwrite

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 60)  # a truncated TIFF
    model = tmp_path / "m"
    model.mkdir()
    (model / "meta.json").write_text("{}")
    cfg = with_collection(scenes=str(tmp_path / "s" / "*.tif"), model=str(model), mosaic=False)
    check_pipeline_inputs(cfg)
    run = plan_collection(cfg, None)
    assert run.plan is StagePlan.FRESH and set(run.inputs) == {"model", "scene bad"}
    with pytest.raises(SegflowError, match=r"collection: 1 of 1 scenes failed \(bad; reasons in"):
        run_collection(run, cfg, device="cpu", dask_address=None)
    assert read_record(cfg.work_path, "segment_collection") is None
    assert plan_collection(cfg, None).plan is not StagePlan.SKIP


def test_training_markdown_names_the_run_its_best_checkpoint_and_final_metrics() -> None:
    from segflow.stages.report import training_markdown

    r = {"steps": 40, "total_steps": 50, "wall_s": 12.5, "stopped_early": True,
         "best_metric": 0.0712, "best_step": 30, "best_checkpoint": "o/best",
         "last_checkpoint": "o/last", "final": {"pixel_error": 0.0734512, "epoch": 3}}  # fmt: skip
    md = training_markdown(r, "pixel_error")
    assert "40 of 50 steps in 12.5 s (stopped early); best pixel_error 0.0712 at step 30" in md
    assert "`o/best`, `o/last`" in md
    assert "| pixel_error | 0.073451 |" in md and "| epoch | 3 |" in md
