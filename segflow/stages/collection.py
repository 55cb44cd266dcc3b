"""segment_collection: segment_region over many scenes, each a stage of its own, and a mosaic.

Every scene is one segment_region run into its own folder with its own stage key (the
image's and the model's content, the request, the code; :mod:`segflow.stages.plan`): a
scene whose record matches and whose outputs exist is skipped, one killed part-way resumes
its prediction store, and one that fails (an unreadable or truncated image, bands the model
does not take) is reported with its one-line reason while the others go on. Scenes run one
after another here, or as one task each on a Dask cluster. Afterwards the summary table
(CSV and Parquet: status, reason, seconds, pixels, class areas, objects) and, for
georeferenced scenes, the mosaic (:mod:`segflow.io.mosaic`: one class COG and one polygon
layer over all scenes, objects crossing scene edges one feature) are written.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segflow.cluster import ENV_ADDRESS
from segflow.config import PipelineConfig
from segflow.config.collection import CollectionRequest
from segflow.config.segment import InstanceOptions, SegmentOptions, SegmentRequest
from segflow.errors import ConfigError, SegflowError, option, options_named
from segflow.io import locations, remote
from segflow.runtime import usable_cores
from segflow.stages.plan import (
    StagePlan,
    StageRun,
    _identity,
    begin_stage,
    finish_stage,
    image_identity,
    known_inputs,
    model_path,
    plan_run,
    stage_code,
)
from segflow.stages.run import skipped

__all__ = [
    "CollectionReport",
    "Scene",
    "SceneResult",
    "check_collection",
    "collection_client",
    "collection_request",
    "list_scenes",
    "plan_collection",
    "run_collection",
    "run_scene",
    "scene_request",
    "segment_collection",
]

#: The per-scene stage's name in its folder's ``stages/`` records.
STAGE = "segment_region"
#: A worker's answer for a scene to run through the cluster's units (``split_pixels``).
LARGE = "large"
#: Request fields that say how a scene runs, not what it computes.
_RUNTIME = {"device", "dask_address", "workers", "overwrite"}


@dataclass(frozen=True)
class Scene:
    """One image of a collection: its folder name, location and (STAC) assets."""

    name: str
    image: str
    assets: tuple[str, ...] = ()


@dataclass(frozen=True)
class SceneResult:
    """What happened to one scene (one row of the summary)."""

    name: str
    image: str
    status: str  # "done", "skipped" or "failed" (a worker's "large": see run_scene)
    reason: str = ""
    seconds: float = 0.0
    pixels: int = 0
    class_areas: dict[str, float] = field(default_factory=dict)
    class_fractions: dict[str, float] = field(default_factory=dict)
    area_unit: str = ""
    objects: int | None = None
    out: str = ""
    georeferenced: bool = False
    split: bool = False  # its units ran as tasks over the cluster's workers


@dataclass(frozen=True)
class CollectionReport:
    """What a segment_collection run did: each scene's result and the collection's files."""

    scenes: tuple[SceneResult, ...]
    outputs: dict[str, str]
    seconds: float

    @property
    def failed(self) -> tuple[SceneResult, ...]:
        return tuple(s for s in self.scenes if s.status == "failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenes": [asdict(s) for s in self.scenes],
            "outputs": self.outputs,
            "seconds": self.seconds,
            "counts": {k: sum(s.status == k for s in self.scenes)
                       for k in ("done", "skipped", "failed")},
        }  # fmt: skip


# --------------------------------------------------------------------------- the scenes
def list_scenes(req: CollectionRequest) -> list[Scene]:
    """The scenes ``req.scenes`` names, in order, each with its folder name.

    Raises
    ------
    ConfigError
        Nothing matches the glob, an empty list, or two scenes with one folder name.
    """
    spec = req.scenes
    if spec.lower().endswith(".json"):
        found = _stac_items(spec, req)
    elif spec.lower().endswith((".txt", ".csv")):
        found = [(_stem(p), p) for p in _listed(spec)]
    else:
        found = [(_stem(p), p) for p in _globbed(spec)]
    if not found:
        raise ConfigError(
            f"{option('scenes')}: {spec!r} names no image: check the glob, list or catalog"
        )
    # --asset picks the bands of STAC Items; other images are read as they are
    scenes = [Scene(req.name.format(stem=stem, index=i), image,
                    req.assets if image.lower().endswith(".json") else ())
              for i, (stem, image) in enumerate(found)]  # fmt: skip
    seen: dict[str, str] = {}
    for s in scenes:
        if s.name in seen:
            raise ConfigError(
                f"scenes {seen[s.name]!r} and {s.image!r} both go to folder {s.name!r}: use a "
                "name template with {index}, e.g. --name '{index}_{stem}'"
            )
        seen[s.name] = s.image
    return scenes


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or name


def _globbed(pattern: str) -> list[str]:
    if not remote.is_url(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    base = pattern.split("*", 1)[0].rsplit("/", 1)[0]
    url = remote.ObjectURL.parse(base)
    keys = remote.list_keys(base)
    prefix = f"{url.scheme}://{url.bucket}/"
    return sorted(prefix + k for k in keys if fnmatch.fnmatchcase(prefix + k, pattern))


def _listed(spec: str) -> list[str]:
    text = locations.read_text(spec)
    if text is None:
        raise ConfigError(f"{option('scenes')}: the list {spec!r} does not exist: check the path")
    base = spec.rsplit("/", 1)[0] if remote.is_url(spec) else str(Path(spec).parent)
    rows = list(csv.reader(io.StringIO(text)))
    col = 0
    if spec.lower().endswith(".csv") and rows and "image" in [c.strip() for c in rows[0]]:
        col = [c.strip() for c in rows[0]].index("image")
        rows = rows[1:]
    out = []
    for row in rows:
        item = row[col].strip() if len(row) > col else ""
        if not item or item.startswith("#"):
            continue
        relative = not remote.is_url(item) and not Path(item).is_absolute()
        out.append(f"{base}/{item}" if relative else item)
    return out


def _stac_items(spec: str, req: CollectionRequest) -> list[tuple[str, str]]:
    """An ItemCollection's Items, each saved as JSON in its scene's folder (absolute hrefs)
    so that the scene is an Item like any other."""
    import pystac

    text = locations.read_text(spec)
    if text is None:
        raise ConfigError(
            f"{option('scenes')}: the catalog {spec!r} does not exist: check the path"
        )
    try:
        items = pystac.ItemCollection.from_dict(json.loads(text), preserve_dict=False)
    except Exception as err:
        raise ConfigError(
            f"{option('scenes')}: {spec!r} is not a STAC ItemCollection ({str(err).splitlines()[0]}): pass "
            "a FeatureCollection of Items"
        ) from None
    out = []
    base = spec if remote.is_url(spec) else str(Path(spec).resolve())
    for item in items:
        for asset in item.assets.values():
            asset.href = pystac.utils.make_absolute_href(asset.href, base)
        where = locations.join(req.scene_dir(item.id), "item.json")
        if isinstance(where, Path):
            where.parent.mkdir(parents=True, exist_ok=True)
        locations.write_text(where, json.dumps(item.to_dict(include_self_link=False)))
        out.append((item.id, str(where)))
    return out


# --------------------------------------------------------------------------- one scene
def scene_request(req: CollectionRequest, scene: Scene) -> SegmentRequest:
    """The segment_region request of one scene: ``req``'s options, outputs in its folder."""
    return SegmentRequest(
        **req.model_dump(include=set(SegmentOptions.model_fields)),
        **(req.model_dump(include=set(InstanceOptions.model_fields)) if req.instances else {}),
        **req.output_paths(req.scene_dir(scene.name)),  # type: ignore[arg-type]
        image=scene.image,
        assets=scene.assets,
        model=req.model,
        level=req.level,
        device=req.device,
        amp=req.amp,
        min_area=req.min_area,
        overwrite=req.overwrite,
    )


def _pixels(scene: Scene, level: int) -> int:
    from segflow.io.sources import open_source

    with open_source(scene.image, level=level, assets=scene.assets) as src:
        return int(src.info.height) * int(src.info.width)


def run_scene(
    req: CollectionRequest,
    scene: Scene,
    *,
    code: str | None = None,
    threads: int | None = None,
    split_above: int | None = None,
    dask_address: str | None = None,
) -> SceneResult:
    """segment_region over one scene, skipped when current; a failure is a result, with its
    one-line reason, never an exception (the other scenes go on).

    ``code`` is the stage's code version (computed once by the caller: it parses every
    module); ``threads``, the torch threads of a scene on a Dask worker (None: the worker's).
    A scene of more than ``split_above`` pixels is not run (nor hashed): its result says
    ``"large"``, for the caller to run it through the cluster's units. ``dask_address``:
    run segment_region's units as tasks on that cluster. A scene's image and model are
    hashed again only when their size or time changed since its last record.
    """
    from segflow.segment import segment_region

    t0 = time.perf_counter()
    _share_cores(threads)
    try:
        if split_above is not None and _pixels(scene, req.level) > split_above:
            return SceneResult(scene.name, scene.image, LARGE)
        sreq = scene_request(req, scene).model_copy(update={"dask_address": dask_address})
        known = known_inputs(req.scene_dir(scene.name), STAGE)
        run = plan_run(
            req.scene_dir(scene.name),
            STAGE,
            params=sreq.model_dump(mode="json", exclude=_RUNTIME),
            inputs={"image": image_identity(scene.image, scene.assets, "image", known),
                    "model": _identity(req.model, "model", known)},
            code=code or stage_code(STAGE),
        )  # fmt: skip
        if run.plan is StagePlan.SKIP and run.previous is not None:
            return _result(scene, "skipped", run.previous.result, time.perf_counter() - t0)
        begin_stage(run)
        report = segment_region(sreq).to_dict()
        summary = {**_scene_summary(report), "split": dask_address is not None}
        finish_stage(run, list(report["outputs"].values()), summary)
        return _result(scene, "done", summary, time.perf_counter() - t0)
    except SegflowError as err:
        return SceneResult(scene.name, scene.image, "failed", str(err).splitlines()[0],
                           round(time.perf_counter() - t0, 2))  # fmt: skip
    except Exception as err:  # a scene's bug or a library's: reported, the others go on
        return SceneResult(scene.name, scene.image, "failed",
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                           round(time.perf_counter() - t0, 2))  # fmt: skip


def _share_cores(threads: int | None) -> None:
    """On a Dask worker, torch uses ``threads`` (its share of the cores; None: the worker's
    thread count), not all the machine's: two workers on two cores would run four threads."""
    try:
        from distributed import get_worker

        threads = threads or int(get_worker().state.nthreads)
    except (ImportError, ValueError):
        return
    import torch

    torch.set_num_threads(max(1, threads))


def _scene_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the summary needs of a segment_region report (also its stage result)."""
    pixels = report["class_pixels"]
    georef, slide = report.get("georef"), report.get("slide") or {}
    if georef:  # map units of a projected CRS (metres)
        gt = georef["geotransform"]
        unit, per_pixel = "m^2", abs(gt[1] * gt[5] - gt[2] * gt[4])
    elif slide.get("mpp_x") and slide.get("mpp_y"):
        unit, per_pixel = "um^2", float(slide["mpp_x"]) * float(slide["mpp_y"])
    else:
        unit, per_pixel = "px", 1.0
    total = sum(pixels.values())
    region = report["region"]
    return {
        "pixels": int(region["height"]) * int(region["width"]),
        "class_areas": {k: float(v) * per_pixel for k, v in pixels.items()},
        # a slide's tissue composition: each class's share of the classified pixels
        "class_fractions": {k: v / total if total else 0.0 for k, v in pixels.items()},
        "area_unit": unit,
        "objects": report["instances"]
        if report.get("instances") is not None
        else report["polygons"],
        "out": report["outputs"]["cog"],
        "georeferenced": bool(georef),
    }


def _result(scene: Scene, status: str, summary: dict[str, Any], seconds: float) -> SceneResult:
    keep = {k: summary[k] for k in ("pixels", "class_areas", "class_fractions", "area_unit",
                                    "objects", "out", "georeferenced", "split")
            if k in summary}  # fmt: skip
    return SceneResult(scene.name, scene.image, status, "", round(seconds, 2), **keep)


# --------------------------------------------------------------------------- the collection
def segment_collection(
    req: CollectionRequest,
    *,
    client: Any = None,
    on_scene: Callable[[SceneResult], None] | None = None,
) -> CollectionReport:
    """Run every scene of ``req`` (on ``client``'s cluster when given), then write the
    summary and the mosaic. Failed scenes are in the report, not raised."""
    t0 = time.perf_counter()
    scenes = check_collection(req)
    if not remote.is_url(req.out_dir):
        Path(req.out_dir).mkdir(parents=True, exist_ok=True)
    results = {r.name: r for r in _run_all(req, scenes, client, on_scene)}
    ordered = tuple(results[s.name] for s in scenes)
    outputs = write_summary(req, ordered)
    if req.mosaic:
        outputs.update(write_mosaic(req, ordered))
    return CollectionReport(ordered, outputs, round(time.perf_counter() - t0, 2))


def check_collection(req: CollectionRequest) -> list[Scene]:
    """Refuse bad input in a second, before any scene runs: a missing model, an output
    folder that cannot be written or that holds a scene (a glob there would take the mosaic
    for a scene next time), a collection that names no image. Returns the scenes."""
    from segflow.outputs import check_output_directory

    if not locations.exists(req.model):
        raise ConfigError(
            f"model not found: {req.model!r}: pass the checkpoint flows/train.py wrote"
        )
    if remote.is_url(req.out_dir):
        remote.check_prefix(remote.check_location(req.out_dir, what="out_dir", write=True),
                            what="out_dir")  # fmt: skip
    else:
        check_output_directory("out_dir", req.out_dir)
    scenes = list_scenes(req)
    if not remote.is_url(req.out_dir):
        own = {str(locations.join(req.scene_dir(s.name), "item.json")) for s in scenes}
        images = [s.image for s in scenes if not remote.is_url(s.image) and s.image not in own]
        check_output_directory("out_dir", req.out_dir, inputs=images)
    return scenes


@contextlib.contextmanager
def collection_client(req: CollectionRequest) -> Iterator[Any]:
    """The Dask client the scenes run on: ``dask_address`` (or ``$SEGFLOW_DASK_ADDRESS``),
    else an embedded cluster of ``workers`` processes sharing the cores; None: here."""
    from segflow.cluster import dask_client

    address = req.dask_address or os.environ.get(ENV_ADDRESS) or None
    if address is None and not req.workers:
        yield None
        return
    # one scene at a time per worker; its torch threads are the worker's share of the cores
    with dask_client(address, n_workers=req.workers, threads_per_worker=1,
                     processes=True) as client:  # fmt: skip
        yield client


def _run_all(req: CollectionRequest, scenes: list[Scene], client: Any,
             on_scene: Callable[[SceneResult], None] | None) -> Iterator[SceneResult]:  # fmt: skip
    if client is None:
        code = stage_code(STAGE)
        for scene in scenes:
            result = run_scene(req, scene, code=code)
            if on_scene:
                on_scene(result)
            yield result
        return
    from distributed import as_completed

    code = stage_code(STAGE)
    embedded = not (req.dask_address or os.environ.get(ENV_ADDRESS))
    threads = max(1, usable_cores() // (req.workers or 1)) if embedded else None
    futures = [client.submit(run_scene, req, s, code=code, threads=threads,
                             split_above=req.split_pixels, key=f"scene-{i}-{s.name}", pure=False)
               for i, s in enumerate(scenes)]  # fmt: skip
    by_name = {s.name: s for s in scenes}
    for future in as_completed(futures):
        result = future.result()
        if result.status == LARGE:  # its units spread over every worker, beside other scenes
            result = run_scene(req, by_name[result.name], code=code,
                               dask_address=client.scheduler.address)  # fmt: skip
        if on_scene:
            on_scene(result)
        yield result


# --------------------------------------------------------------------------- summary, mosaic
def summary_rows(results: tuple[SceneResult, ...]) -> list[dict[str, Any]]:
    """One flat row per scene: class areas and fractions as ``area_<class>`` and
    ``fraction_<class>`` columns."""
    classes = sorted({c for r in results for c in r.class_areas})
    rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k not in ("class_areas", "class_fractions")}
        row.update({f"area_{c}": r.class_areas.get(c, 0.0) for c in classes})
        row.update({f"fraction_{c}": r.class_fractions.get(c, 0.0) for c in classes})
        rows.append(row)
    return rows


def write_summary(req: CollectionRequest, results: tuple[SceneResult, ...]) -> dict[str, str]:
    """``summary.csv`` and ``summary.parquet`` in ``out_dir`` (each written whole)."""
    import pandas as pd

    frame = pd.DataFrame(summary_rows(results))
    csv_at, parquet_at = req.file("summary.csv"), req.file("summary.parquet")
    locations.write_text(csv_at, frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    if remote.is_url(parquet_at):
        remote.write_bytes(parquet_at, buffer.getvalue())
    else:
        from segflow.atomic import atomic_output

        with atomic_output(parquet_at) as tmp:
            tmp.write_bytes(buffer.getvalue())
    return {"summary_csv": csv_at, "summary_parquet": parquet_at}


def write_mosaic(req: CollectionRequest, results: tuple[SceneResult, ...]) -> dict[str, str]:
    """The mosaic COG (and polygons) of the georeferenced scenes that have a prediction."""
    from segflow.io.export import vectorize, write_cog
    from segflow.io.mosaic import Mosaic, place_scenes
    from segflow.io.staging import staged_outputs

    done = [r.out for r in results if r.status != "failed" and r.georeferenced and r.out]
    if not done:
        return {}
    classes = _classes_of(done[0])
    if any(remote.is_url(p) for p in done):
        remote.configure_gdal()
    georef, height, width, placements, (dtype, nodata) = place_scenes(done, crs=req.mosaic_crs)
    mosaic = Mosaic(placements, (height, width), dtype, 255 if nodata is None else int(nodata))
    want = {"mosaic": req.file("mosaic.tif")}
    if req.polygons:
        want["mosaic_polygons"] = req.file("mosaic.gpkg")
    if req.parquet:
        want["mosaic_parquet"] = req.file("mosaic.parquet")
    urls = {k: v for k, v in want.items() if remote.is_url(v)}
    with staged_outputs(urls) as local:
        at = {**want, **local}
        write_cog(mosaic, at["mosaic"], georef=georef, classes=classes, nodata=mosaic.nodata)
        if req.polygons or req.parquet:
            vectorize(mosaic, classes=classes, georef=georef, nodata=mosaic.nodata,
                      min_area=req.min_area, out_gpkg=at.get("mosaic_polygons"),
                      out_parquet=at.get("mosaic_parquet"))  # fmt: skip
    mosaic.close()
    return want


def _classes_of(cog: str) -> list[dict[str, Any]]:
    """The class table a segment_region COG carries (its GDAL metadata)."""
    import rasterio

    with rasterio.open(cog) as ds:
        tags = ds.tags()
    table = json.loads(tags.get("SEGFLOW_CLASSES") or "[]")
    if not table:
        raise ConfigError(f"{cog!r} has no class table: it was not written by segment_region")
    return list(table)


# --------------------------------------------------------------------------- the pipeline's stage
#: The pipeline stage's name (its record in ``{work_dir}/stages/``).
PIPELINE_STAGE = "segment_collection"


def collection_request(
    cfg: PipelineConfig, *, device: str | None = None, dask_address: str | None = None
) -> CollectionRequest:
    """The segment_collection job of ``cfg.collection``: the pipeline's model unless the
    section names one, outputs in ``{work_dir}/collection`` (the pipeline's own folder)."""
    assert cfg.collection is not None
    section = cfg.collection
    return CollectionRequest(
        **section.model_dump(exclude={"model"}),
        model=str(section.model or model_path(cfg)),
        out_dir=str(locations.join(cfg.work_path, "collection")),
        device=device,
        dask_address=dask_address,
        overwrite=True,
    )


def plan_collection(cfg: PipelineConfig, train: StageRun | None) -> StageRun:
    """segment_collection: the model (by content, and the train key when it is the
    pipeline's), every scene's image by content, the section's options."""
    assert cfg.collection is not None
    work = cfg.work_path
    req = collection_request(cfg)
    known = known_inputs(work, PIPELINE_STAGE)
    # one input per scene: a touched scene with the same bytes keeps the key
    scenes = {f"scene {s.name}": image_identity(s.image, s.assets, f"scene {s.name}", known)
              for s in list_scenes(req)}  # fmt: skip
    own_model = not (cfg.collection.model or cfg.segment.model)
    return plan_run(
        work,
        PIPELINE_STAGE,
        upstream={"train": train.key} if train is not None and own_model else {},
        params=cfg.collection.model_dump(mode="json", exclude={"model", "workers", "split_pixels"}),
        inputs={"model": _identity(req.model, "model", known), **scenes},
        code=stage_code(PIPELINE_STAGE),
    )


def run_collection(
    run: StageRun, cfg: PipelineConfig, *, device: str | None, dask_address: str | None
) -> dict[str, Any]:
    """Segment the section's scenes (each skipped when current); recorded only when every
    scene finished, so that a failed one is retried by the next run."""
    if run.plan is StagePlan.SKIP:
        return skipped(run)
    req = collection_request(cfg, device=device, dask_address=dask_address)
    begin_stage(run)
    with options_named("yaml", prefix="collection."), collection_client(req) as client:
        report = segment_collection(req, client=client)
    statuses = [s.status for s in report.scenes]
    result = {"ran": True, "plan": run.plan.value, "seconds": report.seconds,
              "outputs": report.outputs, "scenes": len(statuses),
              **{k: statuses.count(k) for k in ("done", "skipped", "failed")}}  # fmt: skip
    if report.failed:
        names = ", ".join(s.name for s in report.failed[:5])
        raise SegflowError(
            f"collection: {len(report.failed)} of {len(statuses)} scenes failed ({names}; "
            f"reasons in {report.outputs['summary_csv']}): fix or remove them and re-run "
            "(finished scenes are skipped)"
        )
    finish_stage(run, list(report.outputs.values()), result)
    return result
