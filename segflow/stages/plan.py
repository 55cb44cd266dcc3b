"""Stage keys and stage records: what each pipeline stage's outputs were made from.

A pipeline stage (ingest, prepare, train, segment_region) is *current* when the key of what
it would be made from now equals the key recorded when it last finished, and every output
it recorded still exists. The key (:func:`stage_key`) is a SHA-256 over

- the keys of the upstream stages (a changed ingest re-keys everything after it),
- the stage's parameters as canonical JSON (:func:`canonical_json`),
- the content identity of its input files (:func:`path_identity`: SHA-256 of the bytes,
  re-used from the previous record while size and modification time are unchanged),
- the code version (:func:`code_version`): ``segflow.__version__`` plus a hash of the source
  of every ``segflow`` module the stage's entry module imports, transitively (found by
  reading the ``import`` statements, so editing ``segflow/segment.py`` re-keys segment_region
  but not ingest).

Records live in ``<work>/stages/``: ``<stage>.json`` is written (atomically: a temporary
file, then :func:`os.replace`) only after the stage finished; ``<stage>.started.json`` holds
the key of the last run that started, so a killed run with the same key resumes its partial
work, while a different key starts clean (:func:`plan_stage`).

The pipeline's ingredients (:func:`plan_ingest`, :func:`plan_prepare`, :func:`plan_train`,
:func:`plan_segment`): ingest keys on the source and label files' bytes, its options and the
class table; prepare on the ingest key and its options; train on the ingest and prepare keys,
the whole training config and the metadata of any other store it reads; segment_region on
the train key, the checkpoint's files (so a re-trained model, which is not bit-reproducible
under a time limit, re-runs it), the image and its options. Run options that do not change
results (``--device``, the Dask address) are not ingredients.

Examples
--------
>>> k1 = stage_key("prepare", upstream={"ingest": "ab"}, params={"w0": 10.0}, code="c")
>>> k2 = stage_key("prepare", upstream={"ingest": "ab"}, params={"w0": 5.0}, code="c")
>>> k1 == k2
False
>>> plan_stage("k", record=None, started=None)
<StagePlan.FRESH: 'fresh'>
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segflow.errors import CheckpointError, SourceError
from segflow.io import locations, remote
from segflow.stages.code import code_version, module_closure

if TYPE_CHECKING:
    from segflow.config import PipelineConfig

__all__ = [
    "RECORD_VERSION",
    "STAGE_CODE",
    "StagePlan",
    "StageRecord",
    "StageRun",
    "begin_stage",
    "canonical_json",
    "code_version",
    "finish_stage",
    "image_identity",
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
    "read_record",
    "read_started",
    "record_path",
    "stage_key",
    "stage_code",
    "started_path",
    "write_record",
    "write_started",
]

log = logging.getLogger(__name__)

#: Version of the key recipe and record layout: bumping it re-keys every stage.
RECORD_VERSION = 1


class StagePlan(enum.Enum):
    """What a stage does on this run."""

    SKIP = "skip"  #: recorded with this key and every output exists: nothing to do
    RESUME = "resume"  #: the last run that started had this key: keep and finish its work
    FRESH = "fresh"  #: another key (or none): remove the stage's old work and start clean


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage was made from and what it wrote (``<work>/stages/<stage>.json``)."""

    stage: str
    key: str
    outputs: tuple[str, ...] = ()
    result: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "record_version": RECORD_VERSION,
            "stage": self.stage,
            "key": self.key,
            "outputs": list(self.outputs),
            "result": self.result,
            "inputs": self.inputs,
            "upstream": self.upstream,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StageRecord:
        return cls(
            stage=str(doc["stage"]),
            key=str(doc["key"]),
            outputs=tuple(str(p) for p in doc.get("outputs", ())),
            result=dict(doc.get("result") or {}),
            inputs=dict(doc.get("inputs") or {}),
            upstream={str(k): str(v) for k, v in (doc.get("upstream") or {}).items()},
        )


# --------------------------------------------------------------------------- keys
def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON: sorted keys, no whitespace, tuples as lists.

    Pydantic models are dumped in JSON mode first; paths and other objects become strings.

    >>> canonical_json({"b": (1, 2), "a": 1.5})
    '{"a":1.5,"b":[1,2]}'
    """
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def stage_key(
    stage: str,
    *,
    upstream: Mapping[str, str] | None = None,
    params: Any = None,
    inputs: Mapping[str, Any] | None = None,
    code: str = "",
) -> str:
    """The SHA-256 (hex) of everything a stage's outputs depend on.

    Parameters
    ----------
    stage
        The stage's name.
    upstream
        Keys of the stages whose outputs it reads, by name.
    params
        Its parameters (JSON-able, or a pydantic model).
    inputs
        Content identities of the files it reads (:func:`path_identity`); only their
        ``sha256`` entries enter the key, so a touched file with the same bytes keeps it.
    code
        :func:`code_version` of the modules it runs.
    """
    doc = {
        "record_version": RECORD_VERSION,
        "stage": stage,
        "upstream": dict(upstream or {}),
        "params": json.loads(canonical_json(params)),
        "inputs": {name: _content_only(ident) for name, ident in (inputs or {}).items()},
        "code": code,
    }
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def _content_only(ident: Any) -> Any:
    """The parts of an identity that describe content (not where the file is, its size or
    modification time)."""
    if isinstance(ident, Mapping) and "sha256" in ident:  # a file
        return ident["sha256"]
    if isinstance(ident, Mapping) and "files" in ident:  # a directory
        files = ident["files"]
        return {"kind": ident.get("kind"), "files": {k: _content_only(v) for k, v in files.items()}}
    return ident


# --------------------------------------------------------------------------- content identity
def _file_sha256(path: Path) -> str:
    if path.suffix.lower() == ".vrt":  # a mosaic: its hash covers the files it refers to
        from segflow.io.sources import source_sha256

        return source_sha256(path)
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise SourceError(
            f"cannot read {str(path)!r} to hash it ({err.strerror or err}): "
            "check the file exists and is readable"
        ) from None


def _file_identity(path: Path, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    st = path.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if (
        previous
        and previous.get("size") == st.st_size
        and previous.get("mtime_ns") == st.st_mtime_ns
        and previous.get("sha256")
        and path.suffix.lower() != ".vrt"  # the files a VRT refers to have their own mtimes
    ):
        return {**ident, "sha256": str(previous["sha256"])}
    return {**ident, "sha256": _file_sha256(path)}


def path_identity(path: str | Path, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content identity of a file or directory, for :func:`stage_key`.

    A file: ``{"size", "mtime_ns", "sha256"}``; the SHA-256 of ``previous`` (this function's
    earlier answer for the same path) is re-used while size and modification time are
    unchanged, so a large unchanged source is not read again. A ``.vrt`` is always hashed
    with the files it refers to. A Zarr store (a directory with ``zarr.json``): its metadata
    documents (segflow records how every array was made in them). Another directory: every
    file in it. A URL: :func:`segflow.io.locations.identity`.

    Raises
    ------
    SourceError
        ``path`` does not exist or cannot be read.
    """
    if remote.is_url(path):  # an object or a prefix: sizes, ETags and times
        return locations.identity(str(path))
    p = Path(path)
    if p.is_file():
        return _file_identity(p, previous)
    if p.is_dir():
        zarr = (p / "zarr.json").is_file()
        files = sorted(p.rglob("zarr.json") if zarr else (f for f in p.rglob("*") if f.is_file()))
        before = (previous or {}).get("files") or {}
        out: dict[str, Any] = {}
        for f in files:
            rel = f.relative_to(p).as_posix()
            out[rel] = _file_identity(f, before.get(rel))
        return {"kind": "zarr" if zarr else "directory", "files": out}
    raise SourceError(f"input not found: {str(p)!r}: check the path in the config")


# --------------------------------------------------------------------------- records
def record_path(work: str | Path, stage: str) -> Path | str:
    """``<work>/stages/<stage>.json`` (a URL under a ``work`` URL)."""
    return locations.join(work, "stages", f"{stage}.json")


def started_path(work: str | Path, stage: str) -> Path | str:
    """``<work>/stages/<stage>.started.json`` (a URL under a ``work`` URL)."""
    return locations.join(work, "stages", f"{stage}.started.json")


def _read_json(path: Path | str) -> dict[str, Any] | None:
    try:
        text = locations.read_text(path)
        if text is None:
            return None
        doc = json.loads(text)
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable stage record %s (%s)", path, err)
        return None
    if not isinstance(doc, dict) or doc.get("record_version") != RECORD_VERSION:
        return None
    return doc


def read_record(work: str | Path, stage: str) -> StageRecord | None:
    """The record of the stage's last finished run (None: none, unreadable or older layout)."""
    doc = _read_json(record_path(work, stage))
    try:
        return StageRecord.from_dict(doc) if doc else None
    except (KeyError, TypeError, AttributeError):
        return None


def _write_json(path: Path | str, doc: Mapping[str, Any]) -> Path | str:
    """Write a record whole (atomically on disk; in one PUT on object storage)."""
    return locations.write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def write_record(work: str | Path, record: StageRecord) -> Path | str:
    """Record a finished stage (atomically)."""
    return _write_json(record_path(work, record.stage), record.to_dict())


def read_started(work: str | Path, stage: str) -> dict[str, Any] | None:
    """The ``{"key", "inputs", "code", "params"}`` of the stage's last started run (None: none)."""
    return _read_json(started_path(work, stage))


def write_started(
    work: str | Path,
    stage: str,
    key: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    code: str = "",
    params: Any = None,
) -> Path | str:
    """Record that a run of ``stage`` with ``key`` started (before it writes anything)."""
    doc = {
        "record_version": RECORD_VERSION,
        "stage": stage,
        "key": key,
        "inputs": dict(inputs or {}),
        "code": code,
        "params": json.loads(canonical_json(params)),
    }
    return _write_json(started_path(work, stage), doc)


def outputs_exist(outputs: Sequence[str | Path]) -> bool:
    """Whether every path (or URL) in ``outputs`` exists."""
    return all(locations.exists(p) for p in outputs)


def plan_stage(
    key: str, *, record: StageRecord | None, started: Mapping[str, Any] | None
) -> StagePlan:
    """Skip, resume or start clean (see :class:`StagePlan`).

    >>> rec = StageRecord(stage="s", key="k", outputs=())
    >>> plan_stage("k", record=rec, started={"key": "k"})
    <StagePlan.SKIP: 'skip'>
    >>> plan_stage("k2", record=rec, started={"key": "k"})
    <StagePlan.FRESH: 'fresh'>
    """
    if record is not None and record.key == key and outputs_exist(record.outputs):
        return StagePlan.SKIP
    if started is not None and started.get("key") == key:
        return StagePlan.RESUME
    return StagePlan.FRESH


# --------------------------------------------------------------------------- one stage's run
@dataclass(frozen=True)
class StageRun:
    """One stage in one pipeline run: its key, its plan and what the key was made from."""

    stage: str
    key: str
    plan: StagePlan
    work: str
    inputs: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)
    params: Any = None
    code: str = ""
    previous: StageRecord | None = None
    started: dict[str, Any] | None = None

    @property
    def cache_key(self) -> str:
        """The stage key as a cache key for an orchestrator (``stage-sha256``)."""
        return f"{self.stage}-{self.key}"


def known_inputs(work: str | Path, stage: str) -> dict[str, Any]:
    """The input identities the stage last recorded (finished or started), for re-use by
    :func:`path_identity` (its ``previous``)."""
    started = read_started(work, stage) or {}
    record = read_record(work, stage)
    return {**(record.inputs if record else {}), **(started.get("inputs") or {})}


def plan_run(
    work: str | Path,
    stage: str,
    *,
    upstream: Mapping[str, str] | None = None,
    params: Any = None,
    inputs: Mapping[str, Any] | None = None,
    code: str = "",
) -> StageRun:
    """The key of ``stage`` from these ingredients (:func:`stage_key`) and its plan."""
    key = stage_key(stage, upstream=upstream, params=params, inputs=inputs, code=code)
    record = read_record(work, stage)
    started = read_started(work, stage)
    return StageRun(
        stage=stage,
        key=key,
        plan=plan_stage(key, record=record, started=started),
        work=str(work),
        inputs=dict(inputs or {}),
        upstream=dict(upstream or {}),
        params=json.loads(canonical_json(params)),
        code=code,
        previous=record,
        started=started,
    )


def begin_stage(run: StageRun) -> None:
    """Before a stage writes anything: a fresh start forgets the old record (its outputs are
    about to change), and the key is recorded as started so a killed run can resume."""
    if run.plan is StagePlan.SKIP:
        return
    if run.plan is StagePlan.FRESH:
        locations.remove(record_path(run.work, run.stage))
    write_started(run.work, run.stage, run.key, run.inputs, code=run.code, params=run.params)


def finish_stage(
    run: StageRun, outputs: Sequence[str | Path], result: Mapping[str, Any]
) -> StageRecord:
    """Record the stage finished with ``run.key``: what it wrote and what it reported."""
    record = StageRecord(
        stage=run.stage,
        key=run.key,
        outputs=tuple(str(p) for p in outputs),
        result=json.loads(canonical_json(dict(result))),
        inputs=run.inputs,
        upstream=run.upstream,
    )
    write_record(run.work, record)
    return record


# --------------------------------------------------------------------------- the pipeline's stages
#: The library modules each pipeline stage runs (their imports are followed, see
#: :func:`module_closure`) and the packages left out of its code version. ``segflow.config``
#: imports the training schema lazily to validate a config's ``train`` section: that cannot
#: change what ingest and prepare write, so editing training code does not re-run them.
STAGE_CODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ingest": (("segflow.ingest",), ("segflow.train",)),
    "prepare": (("segflow.prepare",), ("segflow.train",)),
    "train": (("segflow.train.loop",), ()),
    "segment_region": (("segflow.segment",), ()),
    "evaluate": (("segflow.evaluation",), ()),
    "segment_collection": (("segflow.stages.collection",), ()),
}


def stage_code(stage: str) -> str:
    """The :func:`code_version` of a pipeline stage (see :data:`STAGE_CODE`)."""
    modules, exclude = STAGE_CODE[stage]
    return code_version(modules, exclude=exclude)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return locations.same(a, b)


def _identity(path: str | Path, name: str, known: Mapping[str, Any]) -> dict[str, Any]:
    """``path_identity`` re-using a known identity only when it was of the same path."""
    prev = known.get(name)
    prev = prev if isinstance(prev, Mapping) and prev.get("path") == str(path) else None
    return {"path": str(path), **path_identity(path, prev)}


def image_identity(
    image: str, assets: Sequence[str], name: str, known: Mapping[str, Any]
) -> dict[str, Any]:
    """An image's identity as input ``name``: a STAC Item's is its selected ``assets``'
    (their content, not the Item's JSON); a file's or object's, :func:`path_identity`
    re-using ``known[name]`` when it was of the same path."""
    from segflow.io.sources import is_stac_item, source_sha256

    if is_stac_item(image):
        return {"path": image, "sha256": source_sha256(image, assets=assets)}
    return _identity(image, name, known)


def plan_ingest(cfg: PipelineConfig) -> StageRun:
    """Ingest: the source and label files' content, the ingest options and class table."""
    work = cfg.work_path
    known = known_inputs(work, "ingest")
    ing = cfg.ingest
    inputs = {"source": image_identity(ing.source, ing.assets, "source", known)}
    for name in ("labels", "instances"):
        path = getattr(ing, name)
        if path is not None:
            inputs[name] = _identity(path, name, known)
    params = {
        # the paths are not parameters: the files' content is in ``inputs``
        "ingest": ing.model_dump(mode="json", exclude={"source", "labels", "instances"}),
        "classes": [c.model_dump(mode="json") for c in cfg.classes],
        "ignore_index": cfg.ignore_index,
    }
    return plan_run(work, "ingest", params=params, inputs=inputs, code=stage_code("ingest"))


def plan_prepare(cfg: PipelineConfig, ingest: StageRun) -> StageRun:
    """Prepare: the scene store (the ingest key) and the prepare options."""
    return plan_run(
        cfg.work_path,
        "prepare",
        upstream={"ingest": ingest.key},
        params=cfg.prepare,
        code=stage_code("prepare"),
    )


def plan_train(
    cfg: PipelineConfig, store: str | Path, ingest: StageRun, prepare: StageRun
) -> StageRun:
    """Train: the whole training config, the pipeline's store (its ingest and prepare keys)
    and the metadata of any other store it reads."""

    work = cfg.work_path
    tcfg = cfg.train
    if tcfg is None:
        raise ValueError("plan_train needs a pipeline with a train section")
    known = known_inputs(work, "train")
    inputs: dict[str, Any] = {}
    refs = [r.store for r in (*tcfg.stores.train, *tcfg.stores.val)]
    for i, path in enumerate(refs):
        if not _same_path(path, store):
            inputs[f"store{i}"] = _identity(path, f"store{i}", known)
    return plan_run(
        work,
        "train",
        upstream={"ingest": ingest.key, "prepare": prepare.key},
        params=tcfg,
        inputs=inputs,
        code=stage_code("train"),
    )


def model_path(cfg: PipelineConfig) -> Path | str:
    """The checkpoint segment_region uses: ``segment.model`` or the pipeline's own."""
    if cfg.segment.model:
        return cfg.segment.model if remote.is_url(cfg.segment.model) else Path(cfg.segment.model)
    return locations.join(cfg.work_path, "train", "best")


def plan_segment(
    cfg: PipelineConfig,
    store: str | Path,
    ingest: StageRun,
    prepare: StageRun,
    train: StageRun | None,
) -> StageRun:
    """segment_region: the model's files (call after training), the image, the options.

    The model enters by content, not only by the train key: a re-trained model (training
    under a time limit is not reproducible) re-runs segmentation even when its key is the
    same.
    """
    work = cfg.work_path
    known = known_inputs(work, "segment_region")
    model = model_path(cfg)
    if not locations.exists(model):
        raise CheckpointError(
            f"checkpoint not found: {str(model)!r}: add a train section or set segment.model"
        )
    upstream: dict[str, str] = {}
    if train is not None and not cfg.segment.model:
        upstream["train"] = train.key
    inputs = {"model": _identity(model, "model", known)}
    image = cfg.segment.image or cfg.ingest.source
    if _same_path(image, store):  # the pipeline's own scene store: key it by its stages
        upstream.update(ingest=ingest.key, prepare=prepare.key)
    elif _same_path(image, cfg.ingest.source):
        inputs["image"] = ingest.inputs["source"]
    else:
        inputs["image"] = _identity(image, "image", known)
    return plan_run(
        work,
        "segment_region",
        upstream=upstream,
        params=cfg.segment,
        inputs=inputs,
        code=stage_code("segment_region"),
    )
