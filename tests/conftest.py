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
