"""Shared fixtures: bundled samples, the optional ../shared/data, seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SHARED = Path(os.environ.get("SEGFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def samples() -> Path:
    """The sample data bundled with the project (always present)."""
    return SAMPLES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set SEGFLOW_SHARED_DATA)")
    return SHARED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def write_scene(
    path: Path,
    image: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    instances: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    chunk: int = 64,
    shard: int | None = None,
    georef: object = None,
    classes: tuple = (),
) -> object:
    """A complete scene store written from in-memory arrays, as ingest would, every array recorded."""
    from segflow.geometry import Window
    from segflow.io.store import SceneStore

    bands, h, w = image.shape
    store = SceneStore.create(
        path,
        bands=[f"b{i}" for i in range(bands)],
        height=h,
        width=w,
        dtype=image.dtype,
        chunk=chunk,
        shard=shard,
        classes=classes,
        georef=georef,  # type: ignore[arg-type]
    )
    arrays = {"image": image, "valid": np.ones((h, w), bool) if valid is None else valid}
    if labels is not None:
        store.create_array("labels", dtype=labels.dtype, fill_value=0)
        arrays["labels"] = labels
    if instances is not None:
        store.create_array("instances", dtype="uint32", fill_value=0)
        arrays["instances"] = instances.astype(np.uint32)
    whole = Window(0, 0, h, w)
    for name, data in arrays.items():
        store.write_window(name, whole, data)
        store.record_array(name, source="test")
    return store
