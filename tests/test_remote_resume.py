"""Resume on object storage: ``kill -9`` mid-ingest and mid-segment_region with the stores on
a real S3-compatible server (moto_server on loopback); the same command skips the finished
units, and the result equals an undisturbed run. Nothing looks complete before it is."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import mosaic_geotiff

from segflow.errors import StoreError
from segflow.ingest import IngestSpec, ingest
from segflow.io import remote
from segflow.io.store import COMPLETE_MARKER, SceneStore
from segflow.segment import SegmentRequest, segment_region
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model
from tests._s3 import SECRET

ROOT = Path(__file__).resolve().parents[1]

#: Runs ``ingest`` (argv: source, out, units) or ``segment`` (argv: image, model, out, units)
#: and SIGKILLs itself once that many units are finished: a kill -9 at a known point.
KILL = textwrap.dedent(
    """
    import os, signal, sys
    what, *args = sys.argv[1:]
    units = int(args[-1])
    def die_after(done, total=None):
        if done >= units:
            os.kill(os.getpid(), signal.SIGKILL)
    if what == "ingest":
        from segflow.ingest import IngestSpec, ingest
        seen = [0]
        def counted(n):
            seen[0] += n
            die_after(seen[0])
        ingest(IngestSpec(source=args[0], out=args[1], chunk=128), progress=counted)
    else:
        from segflow.segment import SegmentRequest, segment_region
        segment_region(SegmentRequest(image=args[0], model=args[1], out=args[2], tile=256,
                                      batch_size=2), progress=die_after)
    """
)


def _killed(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr


def test_ingest_on_s3_resumes_after_kill_9(s3: str, samples: Path, tmp_path: Path) -> None:
    local = samples / "spacenet_atlanta" / "sample_geotiff.tif"
    src = f"{s3}/in/atlanta.tif"
    remote.upload(local, src)
    out = f"{s3}/stores/k.zarr"
    _killed("ingest", src, out, "20")
    assert not remote.exists(f"{out}/{COMPLETE_MARKER}")
    with pytest.raises(StoreError, match="unfinished"):
        SceneStore.open(out)  # nothing looks complete before it is
    done = SceneStore.open(out, unfinished=True).progress("ingest").done()
    assert len(done) >= 20
    resumed = ingest(IngestSpec(source=src, out=out, chunk=128))
    assert resumed.units_skipped == len(done)
    assert resumed.units_written == resumed.units_total - len(done)
    ref = ingest(IngestSpec(source=str(local), out=str(tmp_path / "ref.zarr"), chunk=128))
    assert ref.units_written == resumed.units_total
    a, b = SceneStore.open(out), SceneStore.open(tmp_path / "ref.zarr")
    for name in ("image", "valid"):
        np.testing.assert_array_equal(a.array(name)[...], b.array(name)[...])


def test_segment_region_on_s3_resumes_after_kill_9(s3: str, samples: Path, tmp_path: Path) -> None:
    image = mosaic_geotiff(
        samples / "spacenet_atlanta" / "sample_geotiff.tif", tmp_path / "big.tif"
    )
    cfg = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=8, depth=2,
                      num_res_units=0)  # fmt: skip
    torch.manual_seed(0)
    ckpt = tmp_path / "ck"
    save_checkpoint(ckpt, build_model(cfg).eval(),
                    build_meta(cfg, bands=("pan",), mean=[400.0], std=[300.0], tile=256))  # fmt: skip
    image_url, model_url, out = f"{s3}/in/big.tif", f"{s3}/models/ck", f"{s3}/out/k.tif"
    remote.upload(image, image_url)
    for f in ckpt.iterdir():
        remote.upload(f, f"{model_url}/{f.name}")

    _killed("segment", image_url, model_url, out, "5")
    work = f"{s3}/out/k.predictions.zarr"
    assert not remote.exists(out) and not remote.exists(f"{work}/{COMPLETE_MARKER}")
    done = SceneStore.open(work, unfinished=True).progress("prediction/labels").done()
    assert len(done) >= 5
    req = SegmentRequest(image=image_url, model=model_url, out=out, tile=256, batch_size=2)
    report = segment_region(req)
    assert report.inference["skipped_units"] == len(done)
    assert remote.exists(f"{work}/{COMPLETE_MARKER}")
    ref = segment_region(SegmentRequest(image=str(image), model=str(ckpt), tile=256,
                                        batch_size=2, out=str(tmp_path / "ref.tif")))  # fmt: skip
    assert ref.inference["skipped_units"] == 0
    got = remote.download(out, tmp_path / "k.tif")
    with rasterio.open(got) as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform
