"""segment_region on a Dask cluster: a real ``dask scheduler`` and two ``dask worker`` processes
on loopback, started and stopped here; every output compared with the in-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import rasterio
import torch
from _dask_loopback import LoopbackCluster, running_cluster
from _flow_runner import load_flow

from segflow.config import ClassDef
from segflow.config.segment import SegmentRequest
from segflow.errors import ConfigError
from segflow.geometry import BlockIndex
from segflow.infer.cluster import UnitJob, WorkerError, run_units, unit_groups
from segflow.infer.options import InferenceOptions
from segflow.io.store import SceneStore, staging_path
from segflow.segment import segment_region
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "samples" / "spacenet_atlanta" / "sample_geotiff.tif"
CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building"))
ARRAYS = ("prediction/labels", "prediction/probabilities")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with running_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded U-Net checkpoint for the one-band chip."""
    cfg = ModelConfig(
        arch="unet", in_channels=1, out_channels=2, features=4, depth=2, num_res_units=0
    )
    torch.manual_seed(0)
    meta = build_meta(cfg, bands=("gray",), mean=[120.0], std=[60.0], tile=256, classes=CLASSES)
    path = tmp_path_factory.mktemp("model") / "ck"
    save_checkpoint(path, build_model(cfg).eval(), meta)
    return path


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 2048 georeferenced mosaic of the chip (enough units to kill a worker mid-run)."""
    with rasterio.open(CHIP) as src:
        chip, profile = src.read(1), src.profile
    tiled = np.tile(chip, (3, 3))[:2048, :2048]
    profile.update(height=2048, width=2048, tiled=True, blockxsize=256, blockysize=256)
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(tiled, 1)
    return path


def _flow_module() -> Any:
    return load_flow("segment_region.py")


def _request(image: Path, model: Path, out: Path, **kw: Any) -> SegmentRequest:
    out.mkdir(parents=True, exist_ok=True)
    return SegmentRequest(
        image=str(image),
        model=str(model),
        out=str(out / "m.tif"),
        probabilities=str(out / "p.tif"),
        **{"tile": 128, **kw},
    )


def _arrays(report: Any) -> dict[str, np.ndarray]:
    store = SceneStore.open(report.inference["store_path"])
    return {name: store.array(name)[...] for name in ARRAYS}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("mode", ["crop", "gaussian"])
def test_two_workers_through_the_address_equal_the_in_process_run(
    cluster: LoopbackCluster, model: Path, tmp_path: Path, mode: str
) -> None:
    cluster.ensure_workers(2)
    inst = {d: str(tmp_path / d / "i.tif") for d in ("local", "far")}  # ids: any worker count
    local = segment_region(
        _request(CHIP, model, tmp_path / "local", mode=mode, instances=inst["local"])
    )
    before = {n: s.executed for n, s in cluster.stats().items()}
    far = segment_region(
        _request(
            CHIP,
            model,
            tmp_path / "far",
            mode=mode,
            dask_address=cluster.address,
            instances=inst["far"],
        )
    )
    _assert_same(_arrays(local), _arrays(far))
    for name in ("m.tif", "i.tif"):
        with (
            rasterio.open(tmp_path / "local" / name) as a,
            rasterio.open(tmp_path / "far" / name) as b,
        ):
            np.testing.assert_array_equal(a.read(), b.read())
    assert far.instances == local.instances
    workers = far.inference["workers"]
    text = _flow_module().summary(far.to_dict())
    assert all(f"| worker `{w}` |" in text for w in workers)  # the Prefect summary's lines
    assert len(workers) == 2 and all(w["units"] > 0 for w in workers.values())
    assert sum(w["units"] for w in workers.values()) == far.inference["units"]
    after = {n: s.executed for n, s in cluster.stats().items()}
    assert all(after[n] > before.get(n, 0) for n in after)  # both workers executed tasks
    if mode == "crop":  # tiles aligned with units: each computed once, as in one process
        assert far.inference["tiles"] == local.inference["tiles"]
    else:  # a window straddling two tasks' units is computed by both (bit-identical sums)
        assert far.inference["tiles"] >= local.inference["tiles"]


def test_a_worker_killed_mid_run_has_its_units_recomputed(
    cluster: LoopbackCluster, model: Path, mosaic: Path, tmp_path: Path
) -> None:
    cluster.ensure_workers(2)
    ref = segment_region(_request(mosaic, model, tmp_path / "ref"))
    victim = sorted(n for n, p in cluster.procs.items() if n != "scheduler" and p.poll() is None)[0]
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed and done >= total // 4:
            cluster.kill_worker(victim)
            killed.append(done)

    run = segment_region(
        _request(mosaic, model, tmp_path / "run", dask_address=cluster.address),
        progress=progress,
    )
    assert killed and killed[0] < run.inference["units"]  # killed while units were left
    _assert_same(_arrays(ref), _arrays(run))
    assert run.inference["skipped_units"] == 0 and run.inference["units"] == ref.inference["units"]


COORDINATOR = textwrap.dedent(
    """
    import sys
    from segflow.config.segment import SegmentRequest
    from segflow.segment import segment_region
    image, model, out, address = sys.argv[1:5]
    segment_region(SegmentRequest(image=image, model=model, out=out + "/m.tif",
                                  probabilities=out + "/p.tif", tile=128, batch_size=1,
                                  dask_address=address))
    """
)


def test_a_killed_coordinator_resumes_without_recomputing_recorded_units(
    cluster: LoopbackCluster, model: Path, mosaic: Path, tmp_path: Path
) -> None:
    cluster.ensure_workers(2)
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, str(mosaic), str(model), str(out), cluster.address],
        start_new_session=True,
    )
    store_path = staging_path(out / "m.predictions.zarr")
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if store_path.exists():
            try:
                done = len(SceneStore.open(store_path).progress(ARRAYS[0]).done())
            except Exception:  # the store is being made
                done = 0
            if done >= 8:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the coordinator finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    # the tasks already running on the workers finish and record their units: wait for them
    def executing(dask_worker: Any) -> int:
        return len(dask_worker.state.executing)

    while any(cluster.client.run(executing).values()):
        time.sleep(0.2)
    recorded = len(SceneStore.open(store_path).progress(ARRAYS[0]).done())
    assert recorded >= 8
    resumed = segment_region(
        _request(mosaic, model, out, batch_size=1, dask_address=cluster.address)
    )
    assert resumed.inference["skipped_units"] == recorded
    total = resumed.inference["skipped_units"] + resumed.inference["units"]
    # the same batch size: a batch's size changes the last bit of a CPU convolution
    ref = segment_region(_request(mosaic, model, tmp_path / "ref", batch_size=1))
    assert total == ref.inference["units"]  # every unit once: the recorded ones not again
    _assert_same(_arrays(ref), _arrays(resumed))


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(
    model: Path, tmp_path: Path
) -> None:
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "2s"}),
        pytest.raises(
            ConfigError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:9'"
        ),
    ):
        segment_region(_request(CHIP, model, tmp_path, dask_address="tcp://127.0.0.1:9"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("image", "device", "expected"),
    [
        ("gone.tif", "cpu", r"worker tcp://127\.0\.0\.1:\d+: .*gone\.tif"),
        (None, "cuda", r"worker tcp://127\.0\.0\.1:\d+: device 'cuda' asked for but CUDA is not"),
    ],
)
def test_a_worker_that_cannot_run_the_task_names_itself_and_records_nothing(
    cluster: LoopbackCluster,
    model: Path,
    tmp_path: Path,
    image: str | None,
    device: str,
    expected: str,
) -> None:
    """An unreadable source, or a CUDA run on a worker without a GPU: the task fails on the
    worker before any unit is written; one line naming it, nothing recorded."""
    cluster.ensure_workers(2)
    ok = segment_region(_request(CHIP, model, tmp_path / "ok"))
    store = SceneStore.open(ok.inference["store_path"], mode="r+")
    store.progress(ARRAYS[0]).reset()
    job = UnitJob(
        image=str(tmp_path / image) if image else str(CHIP),
        level=0,
        model=str(model),
        store=str(store.path),
        options=InferenceOptions(tile=128, halo=8, device=device),
        mean=(120.0,),
        std=(60.0,),
        origin=(0, 0),
        units=(BlockIndex(0, 0),),
        num_classes=2,
        label_dtype="|u1",
        standalone=True,
    )
    with pytest.raises(WorkerError, match=expected):
        cluster.client.submit(run_units, job, pure=False).result()
    assert store.progress(ARRAYS[0]).done() == set()


def test_a_rerun_task_counts_the_units_its_dead_attempt_recorded(
    cluster: LoopbackCluster, model: Path, tmp_path: Path
) -> None:
    """A task re-run after its worker died skips the units the first attempt recorded, and
    still reports them: they were written in this run (the run's unit count stays whole)."""
    cluster.ensure_workers(1)
    ok = segment_region(_request(CHIP, model, tmp_path / "ok"))
    store = SceneStore.open(ok.inference["store_path"], mode="r+")
    units = sorted(store.progress(ARRAYS[0]).done())
    assert len(units) >= 2
    store.progress(ARRAYS[0]).reset()
    store.progress(ARRAYS[0]).mark(units[0])  # the dead attempt's
    job = UnitJob(
        image=str(CHIP), level=0, model=str(model), store=str(store.path),
        options=InferenceOptions(tile=128, halo=8, device="cpu"), mean=(120.0,), std=(60.0,),
        origin=(0, 0), units=tuple(units), num_classes=2, label_dtype="|u1", standalone=True,
    )  # fmt: skip
    r = cluster.client.submit(run_units, job, pure=False).result()
    assert sorted(r["sizes"]) == sorted(store.grid.window(u.row, u.col).size for u in units)
    assert sum(r["sizes"]) == ok.region.width * ok.region.height
    assert store.progress(ARRAYS[0]).done() == set(units)


def test_unit_groups_cover_every_unit_once_in_compact_blocks() -> None:
    units = [BlockIndex(r, c) for r in range(7) for c in range(10)]
    groups = unit_groups(units, strip_units=4, target=6)
    flat = [u for g in groups for u in g]
    assert sorted(flat) == sorted(units) and len(flat) == len(units)
    for g in groups:
        assert len({u.col // 4 for u in g}) == 1  # one column strip
        rows = sorted({u.row for u in g})
        assert rows == list(range(rows[0], rows[-1] + 1))  # contiguous rows


def test_an_embedded_gpu_cluster_has_one_worker_per_device_with_the_gpu_resource() -> None:
    """Without dask-cuda: worker processes that each see one device and declare GPU=1 (on this
    CPU machine the devices do not exist; the wiring is what is checked)."""
    from segflow.cluster import gpu_client

    def seen() -> tuple[str, str]:
        from distributed import get_worker

        return os.environ.get("CUDA_VISIBLE_DEVICES", ""), str(get_worker().name)

    with gpu_client(2, threads=1) as client:
        workers = client.scheduler_info()["workers"].values()
        assert sorted(w["resources"].get("GPU") for w in workers) == [1, 1]
        futures = [client.submit(seen, pure=False, resources={"GPU": 1}) for _ in range(4)]
        assert {tuple(f.result()) for f in futures} <= {("0", "gpu0"), ("1", "gpu1")}
        assert all(
            h.startswith("127.0.0.1") or "127.0.0.1" in h
            for h in [w["host"] for w in client.scheduler_info()["workers"].values()]
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crop", "gaussian"])
def test_a_4096_mosaic_on_two_embedded_workers_equals_the_in_process_run(
    model: Path, tmp_path: Path, mode: str
) -> None:
    """``--workers 2`` (an embedded cluster of two processes) over 4096 x 4096 pixels."""
    with rasterio.open(CHIP) as src:
        chip, profile = src.read(1), src.profile
    profile.update(height=4096, width=4096, tiled=True, blockxsize=512, blockysize=512)
    image = tmp_path / "mosaic4096.tif"
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(np.tile(chip, (5, 5))[:4096, :4096], 1)
    local = segment_region(_request(image, model, tmp_path / "local", mode=mode, tile=512))
    two = segment_region(_request(image, model, tmp_path / "two", mode=mode, tile=512, workers=2))
    assert len(two.inference["workers"]) == 2
    _assert_same(_arrays(local), _arrays(two))
