"""Model checkpoints: safetensors weights plus a JSON document (DESIGN.md section 5).

A checkpoint is a directory::

    model.safetensors   the state dict (safetensors.torch.save_file; never a pickle)
    checkpoint.json     CheckpointMeta: architecture config, class table, bands,
                        normalisation, tile/halo/size_multiple, training provenance,
                        metrics, and the list of tensors with shapes and dtypes

Loading also re-measures the network's receptive-field radius
(:func:`segflow.train.models.halo`, cached per architecture config for the process) and refuses
a recorded ``halo`` below it (:func:`check_halo`): with too little context, overlap-tile
inference shows seams at tile edges.

Loading never unpickles: ``torch.load`` is never called, a pickle or zip file (what
``torch.save`` writes) is refused, and the network is rebuilt from the JSON config and
filled with :func:`safetensors.torch.load_file`, strictly (every tensor name and shape
must match the rebuilt network and the JSON listing). Saving writes a temporary sibling
directory and renames it into place, so no half-written checkpoint is ever found at the
target path.

Examples
--------
>>> import tempfile, pathlib, torch
>>> from segflow.train.models import ModelConfig, build_model
>>> cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=2, depth=1)
>>> meta = build_meta(cfg, bands=["gray"], mean=[0.5], std=[0.2], tile=64)
>>> meta.halo  # measured: the network's receptive-field radius
9
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
>>> save_checkpoint(path, build_model(cfg), meta)
>>> model, meta2 = load_checkpoint(path)
>>> meta2.model == cfg, sorted(p.name for p in path.iterdir())
(True, ['checkpoint.json', 'model.safetensors'])
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from segflow import __version__
from segflow.atomic import write_json_atomic
from segflow.config import DEFAULT_CLASSES, ClassDef, format_validation_error
from segflow.errors import CheckpointError, ConfigError
from segflow.io import remote
from segflow.io.locations import ENV_CACHE_DIR, cache_root, configured_cache_dir
from segflow.normalization import Normalization
from segflow.train import models as _models
from segflow.train.models import ModelConfig, build_model, size_multiple, tile_independent

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "ENV_CACHE_DIR",
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointMeta",
    "Normalization",
    "build_meta",
    "check_halo",
    "halo_cache_dir",
    "load_checkpoint",
    "load_checkpoint_cached",
    "read_meta",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "segflow-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")

log = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckpointMeta(_Frozen):
    """The ``checkpoint.json`` document (**contract**: inference reads it).

    Attributes
    ----------
    model
        The architecture config; :func:`segflow.train.models.build_model` rebuilds it.
    classes
        The class table, one entry per output channel (ids ``0 .. K-1`` in order).
    ignore_index
        The label value of unlabelled pixels used in training.
    bands
        Input band names, one per input channel.
    normalization
        Per-band mean and std, computed on the training region and applied unchanged.
    tile
        Training patch size (a multiple of ``size_multiple``).
    halo
        Context (pixels) needed on each side of a tile for seamless crop merging.
    size_multiple, tile_independent
        As :func:`~segflow.train.models.size_multiple` and
        :func:`~segflow.train.models.tile_independent` of ``model`` (checked).
    training
        Provenance: data hashes, epochs, seed, loss... (JSON values).
    metrics
        Validation metrics (JSON values, e.g. :func:`segflow.train.metrics.summary`).
    tensors
        ``{name: [shape, dtype]}`` of ``model.safetensors``; filled by
        :func:`save_checkpoint`.
    """

    format: Literal["segflow-checkpoint"] = "segflow-checkpoint"
    format_version: Literal[1] = 1
    model: ModelConfig
    classes: tuple[ClassDef, ...] = DEFAULT_CLASSES
    ignore_index: Annotated[int, Field(ge=0, le=65535)] | None = 255
    bands: tuple[Annotated[str, Field(min_length=1)], ...]
    normalization: Normalization
    tile: Annotated[int, Field(gt=0)]
    halo: Annotated[int, Field(ge=0)]
    size_multiple: Annotated[int, Field(ge=1)]
    tile_independent: bool
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    segflow_version: str = __version__
    tensors: dict[str, tuple[tuple[int, ...], str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointMeta:
        m = self.model
        ids = [c.id for c in self.classes]
        if ids != list(range(m.out_channels)):
            raise ValueError(
                f"classes must have ids 0..{m.out_channels - 1} in order (one per output "
                f"channel of the model), got ids {ids}"
            )
        if self.ignore_index is not None and self.ignore_index in ids:
            raise ValueError(f"ignore_index {self.ignore_index} is also a class id")
        if len(self.bands) != m.in_channels:
            raise ValueError(
                f"{len(self.bands)} bands {list(self.bands)} for a model with "
                f"{m.in_channels} input channels"
            )
        if len(self.normalization.mean) != len(self.bands):
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} values for "
                f"{len(self.bands)} bands"
            )
        if self.size_multiple != size_multiple(m):
            raise ValueError(f"size_multiple {self.size_multiple} does not match the model "
                             f"({size_multiple(m)})")
        if self.tile_independent != tile_independent(m):
            raise ValueError(f"tile_independent {self.tile_independent} does not match the "
                             f"model ({tile_independent(m)})")
        if self.tile % self.size_multiple:
            raise ValueError(f"tile {self.tile} is not a multiple of size_multiple "
                             f"{self.size_multiple}")
        return self


def build_meta(
    model: ModelConfig,
    *,
    bands: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    tile: int,
    classes: Sequence[ClassDef] = DEFAULT_CLASSES,
    ignore_index: int | None = 255,
    halo: int | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> CheckpointMeta:
    """A :class:`CheckpointMeta` with the derived fields filled in.

    ``size_multiple`` and ``tile_independent`` come from the config; ``halo``, unless
    given, is measured with :func:`segflow.train.models.halo`.

    Raises
    ------
    CheckpointError
        The values do not fit together (one line naming the problem).
    """
    try:
        return CheckpointMeta.model_validate(dict(
            model=model, classes=tuple(classes), ignore_index=ignore_index, bands=tuple(bands),
            normalization={"mean": tuple(mean), "std": tuple(std)}, tile=tile,
            halo=_models.halo(model) if halo is None else halo,
            size_multiple=size_multiple(model), tile_independent=tile_independent(model),
            training=dict(training or {}), metrics=dict(metrics or {}),
        ))
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source="checkpoint metadata")) from err


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    # clone: safetensors refuses tensors that share storage
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _listing(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in sorted(tensors.items())}


def _compare(what: str, expected: Mapping[str, tuple[tuple[int, ...], Any]],
             found: Mapping[str, tuple[tuple[int, ...], Any]], *, dtypes: bool) -> str | None:
    """One line describing how ``found`` differs from ``expected``, or None."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]!r})")
        return f"{what}: tensor names differ: {', '.join(parts)}"
    for name in sorted(expected):
        e_shape, e_dtype = expected[name]
        f_shape, f_dtype = found[name]
        if tuple(e_shape) != tuple(f_shape):
            return f"{what}: tensor {name!r} has shape {list(f_shape)}, expected {list(e_shape)}"
        if dtypes and e_dtype != f_dtype:
            return f"{what}: tensor {name!r} has dtype {f_dtype}, expected {e_dtype}"
    return None


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta, *,
                    overwrite: bool = False) -> None:
    """Write ``model`` and ``meta`` as a checkpoint directory at ``path``, atomically.

    The tensors are checked against a network rebuilt from ``meta.model`` (so the
    checkpoint is loadable), ``meta.tensors`` is filled from the state dict, and both
    files are written into a temporary sibling directory that is then renamed to
    ``path``. With ``overwrite=True`` an existing checkpoint is replaced (moved aside,
    then deleted after the new one is in place). On object storage (``s3://``) the files
    are written locally and uploaded, ``checkpoint.json`` last: a reader finds the weights
    it describes.

    Raises
    ------
    CheckpointError
        ``path`` exists (without ``overwrite``), or the model does not match
        ``meta.model``.
    """
    if remote.is_url(path):
        url = remote.check_location(path, what="checkpoint", write=True)
        if not overwrite and remote.exists(f"{url}/{META_FILE}"):
            raise CheckpointError(f"checkpoint {url!r} already exists: choose a new URL or "
                                  "pass overwrite=True")
        with tempfile.TemporaryDirectory(prefix="segflow-checkpoint-") as scratch:
            save_checkpoint(Path(scratch) / "checkpoint", model, meta)
            for name in (WEIGHTS_FILE, META_FILE):
                remote.upload(Path(scratch) / "checkpoint" / name, f"{url}/{name}")
        return
    target = Path(path)
    if target.exists() and not overwrite:
        raise CheckpointError(
            f"checkpoint path {str(target)!r} already exists: choose a new path or pass "
            "overwrite=True"
        )
    tensors = _state_dict(model)
    expected = _listing(build_model(meta.model).state_dict())
    problem = _compare("model does not match meta.model", expected, _listing(tensors),
                       dtypes=False)
    if problem:
        raise CheckpointError(f"{problem}: build the model from meta.model")
    meta = meta.model_copy(update={"tensors": _listing(tensors)})
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        for name in (WEIGHTS_FILE, META_FILE):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{tmp.name}.old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sniff(path: Path) -> str:
    """'pickle', 'zip', 'safetensors' or 'unknown', from the first bytes of a file."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
    return "unknown"


def _refuse_pickle(path: Path, kind: str) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is a {kind} file (what torch.save writes): loading it could run "
        "arbitrary code, so segflow refuses; re-save the weights with "
        "segflow.train.checkpoint.save_checkpoint (safetensors)"
    )


def fetch_checkpoint(url: str) -> Path:
    """A local copy of the checkpoint directory at ``url`` (object storage or HTTP).

    Kept in ``checkpoints/`` of the cache directory (:func:`halo_cache_dir`'s parent, or a
    temporary directory without one) under a digest of the two objects' identities (URL,
    size, ETag, time: two HEAD requests), so a checkpoint is downloaded once and again only
    when it changes. The copy is built under a temporary name and renamed into place.
    """
    base = remote.check_location(url, what="checkpoint")
    names = (META_FILE, WEIGHTS_FILE)
    ids = [remote.object_identity(f"{base}/{name}") for name in names]
    root = cache_root() / "checkpoints"
    folder = root / hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]
    if all((folder / name).is_file() for name in names):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        for name in names:
            remote.download(f"{base}/{name}", tmp / name)
        os.replace(tmp, folder)
    except OSError:  # another process put the same copy in place first
        if not all((folder / name).is_file() for name in names):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    if remote.is_url(path):
        return fetch_checkpoint(str(path))
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {str(p)!r}: check the path")
    if p.is_file():
        if p.name in (META_FILE, WEIGHTS_FILE):
            return p.parent
        kind = _sniff(p)
        if kind in ("pickle", "zip") or p.suffix in _PICKLE_SUFFIXES:
            raise _refuse_pickle(p, kind if kind in ("pickle", "zip") else "pickle-like")
        raise CheckpointError(
            f"{str(p)!r} is a file, not a checkpoint directory: pass the directory that "
            f"holds {WEIGHTS_FILE} and {META_FILE}"
        )
    return p


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Read and validate ``checkpoint.json`` of a checkpoint directory (no weights loaded).

    Raises
    ------
    CheckpointError
        Missing directory or file, not JSON, another format or version, or invalid.
    """
    directory = _checkpoint_dir(path)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {META_FILE}: not a segflow checkpoint")
    try:
        raw = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(meta_path)!r} is not valid JSON ({err}): the checkpoint "
                              "is damaged; save it again") from err
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{str(meta_path)!r}: format is {got!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}: not a segflow checkpoint")
    if raw.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{str(meta_path)!r}: format_version {raw.get('format_version')!r} is not supported "
            f"(this segflow {__version__} reads version {CHECKPOINT_FORMAT_VERSION}): use the "
            "segflow version that wrote it"
        )
    try:
        return CheckpointMeta.model_validate(raw)
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=str(meta_path))) from err


def check_halo(meta: CheckpointMeta, where: str | os.PathLike[str]) -> int:
    """Refuse a recorded halo below the receptive-field radius of the checkpoint's network.

    The radius is re-measured with :func:`segflow.train.models.halo` (the measurement that
    filled ``halo`` when the checkpoint was made, on a slim copy of the architecture), so an
    edited or stale ``checkpoint.json`` cannot make inference use too little context. The
    measurement takes 0.3-1 s of CPU for the U-Nets, FCNs and SegResNet, 4.5 s for SegNet,
    13-43 s for FlexibleUNet and FC-DenseNet, so it is cached: per process, and on disk in
    :func:`halo_cache_dir` (one small JSON file per architecture config, keyed by the config,
    the source of :mod:`segflow.train.models` and the torch and MONAI versions: a change to
    any of them measures again). Set ``SEGFLOW_CACHE_DIR=none`` to keep nothing on disk.

    Parameters
    ----------
    meta
        The checkpoint's metadata.
    where
        The checkpoint's path, for the message.

    Returns
    -------
    int
        The measured radius (pixels); ``meta.halo`` is at least this.

    Raises
    ------
    CheckpointError
        ``meta.halo`` is below the measured radius, or the radius cannot be measured.

    Examples
    --------
    >>> from segflow.train.models import ModelConfig
    >>> cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=2, depth=1,
    ...                   num_res_units=0)
    >>> meta = build_meta(cfg, bands=["gray"], mean=[0.0], std=[1.0], tile=64, halo=0)
    >>> check_halo(meta, "ckpt")
    Traceback (most recent call last):
    ...
    segflow.errors.CheckpointError: checkpoint 'ckpt' records halo 0 px, below the 4 px receptive-field radius measured for its 'unet' network, so tiles would show seams: restore "halo": 4 (or more) in checkpoint.json, or re-export the checkpoint with save_checkpoint(path, model, build_meta(...)), which measures it
    """
    try:
        measured = _measured_halo(meta.model)
    except ConfigError as err:
        raise CheckpointError(
            f"checkpoint {str(where)!r}: the receptive field of its {meta.model.arch!r} network "
            f"cannot be measured ({err}): tiled inference cannot be made seamless with it"
        ) from err
    if meta.halo < measured:
        raise CheckpointError(
            f"checkpoint {str(where)!r} records halo {meta.halo} px, below the {measured} px "
            f"receptive-field radius measured for its {meta.model.arch!r} network, so tiles "
            f'would show seams: restore "halo": {measured} (or more) in {META_FILE}, or '
            "re-export the checkpoint with save_checkpoint(path, model, build_meta(...)), "
            "which measures it"
        )
    return measured


def halo_cache_dir() -> Path | None:
    """Where measured receptive-field radii are kept between processes (None: nowhere).

    ``$SEGFLOW_CACHE_DIR/halo`` (``none`` turns the cache off), else
    ``$XDG_CACHE_HOME/segflow/halo``, else ``~/.cache/segflow/halo``.
    """
    cache = configured_cache_dir()
    return None if cache is None else cache / "halo"


@functools.lru_cache(maxsize=1)
def _measurement_version() -> str:
    """What a measured halo depends on besides the config: the code and its libraries."""
    import monai

    source = Path(_models.__file__).read_bytes()
    return f"models:{hashlib.sha256(source).hexdigest()[:16]} torch:{torch.__version__} " \
           f"monai:{monai.__version__}"


def _halo_cache_file(cfg: ModelConfig) -> Path | None:
    root = halo_cache_dir()
    if root is None:
        return None
    key = json.dumps({"model": cfg.model_dump(mode="json"), "version": _measurement_version()},
                     sort_keys=True)
    return root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _measured_halo(cfg: ModelConfig) -> int:
    """:func:`segflow.train.models.halo`, through the on-disk cache (errors there ignored)."""
    path = _halo_cache_file(cfg)
    if path is not None:
        try:
            doc = json.loads(path.read_text())
            value = doc["halo"]
            if isinstance(value, int) and value >= 0 and doc.get("model") == cfg.model_dump(
                    mode="json"):
                return value
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or damaged: measure again
    measured = _models.halo(cfg)
    if path is not None:
        doc = {"halo": measured, "model": cfg.model_dump(mode="json"),
               "version": _measurement_version()}
        try:
            write_json_atomic(path, doc, indent=None)
        except OSError as err:  # a read-only or full cache: measured again next time
            log.debug("cannot cache the measured halo in %s: %s", path.parent, err)
    return measured


def load_checkpoint(path: str | os.PathLike[str], *,
                    map_location: str | torch.device = "cpu",
                    verify_halo: bool = True) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild a model from a checkpoint directory, without unpickling anything.

    Parameters
    ----------
    path
        The checkpoint directory (or its ``checkpoint.json`` / ``model.safetensors``).
    map_location
        Device the model is moved to.
    verify_halo
        Re-measure the network's receptive-field radius and refuse a recorded ``halo``
        below it (:func:`check_halo`). The first load of an architecture config in a
        process measures it (0.1-2 s on a CPU core for the U-Nets, longer for the deepest
        networks); later loads use the cached value. Pass False only where the halo is not
        used (e.g. to inspect or fine-tune the weights).

    Returns
    -------
    (torch.nn.Module, CheckpointMeta)
        The model in eval mode, and the metadata.

    Raises
    ------
    CheckpointError
        Missing directory or files; a pickle/zip (``torch.save``) file in place of, or
        instead of, ``model.safetensors``; JSON that does not validate; tensors that do
        not match the network built from the JSON, or the JSON's tensor listing; a
        recorded halo below the network's receptive-field radius.
    """
    directory = _checkpoint_dir(path)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(directory / pickles[0], "pickle-like")
        raise CheckpointError(f"{str(directory)!r} has no {WEIGHTS_FILE}: not a segflow "
                              "checkpoint (or an incomplete copy)")
    kind = _sniff(weights)
    if kind in ("pickle", "zip"):
        raise _refuse_pickle(weights, kind)
    if kind != "safetensors":
        raise CheckpointError(f"{str(weights)!r} is not a safetensors file (truncated or "
                              "damaged): save the checkpoint again")
    meta = read_meta(directory)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(weights)!r} cannot be read as safetensors ({err}): "
                              "save the checkpoint again") from err
    found = _listing(tensors)
    problem = _compare(f"{WEIGHTS_FILE} does not match the tensors listed in {META_FILE}",
                       meta.tensors, found, dtypes=True)
    if problem:
        raise CheckpointError(f"{directory}: {problem}: the files do not belong together")
    model = build_model(meta.model)
    problem = _compare(f"{WEIGHTS_FILE} does not fit the {meta.model.arch!r} network of "
                       f"{META_FILE}", _listing(model.state_dict()), found, dtypes=False)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    if verify_halo:
        check_halo(meta, directory)
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval(), meta


def load_checkpoint_cached(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointMeta]:
    """:func:`load_checkpoint`, once per process while the checkpoint's files are unchanged.

    The command line checks a request before Prefect starts and the flow then runs it; a Dask
    worker serves many tasks with one model, loaded from its path (nothing is pickled over
    the wire). The cache holds two checkpoints; the model is shared, so callers must not
    change its weights.
    """
    root = fetch_checkpoint(str(path)) if remote.is_url(path) else Path(path)
    files = [root] if root.is_file() else [root / META_FILE, root / WEIGHTS_FILE]
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files)
    return _load_cached(str(root.resolve()), stamp)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, stamp: tuple[object, ...]) -> tuple[nn.Module, CheckpointMeta]:
    return load_checkpoint(path)
