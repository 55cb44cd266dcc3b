"""Real Dask engines on loopback: a ``dask scheduler`` and two ``dask worker`` processes.

The module starts them itself (and always stops them), then

* runs the ingest and prepare command lines through the scheduler, one by ``--dask-address``
  and one by ``$SEGFLOW_DASK_ADDRESS``, from a directory other than the workers' with relative
  paths, checks that the work ran on those workers and that the store equals the one the
  embedded default cluster makes;
* SIGKILLs one worker while prepare is writing the weight map and checks that prepare still
  finishes with a store equal, bit for bit, to an undisturbed run;
* runs prepare on a raster-label store (no ``instances``: they are derived from the labels)
  through the embedded client of :func:`segflow.cluster.dask_client` and checks it equals the
  client-less (``dask.compute``) path bit for bit.

Workers run without a nanny (``--no-nanny``): each is one process, so the pair starts faster
on two cores, and killing its process group loses the worker for good, like a lost machine.
The surviving worker must then recompute everything the dead one held (a nanny would only
restart it, the easier case); segflow's writes are whole write units, so a task that runs twice
writes the same bytes twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _dask_loopback import LoopbackCluster, running_cluster
from conftest import write_scene

from segflow.cluster import ENV_ADDRESS, dask_client
from segflow.config import PrepareConfig, load_config
from segflow.fingerprint import Fingerprint
from segflow.ingest import IngestSpec, ingest
from segflow.io.store import SceneStore
from segflow.prepare import is_current, prepare_store

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "spacenet_atlanta_buildings.yaml"
ISBI_SLICE = ROOT / "pipelines" / "isbi2012_slice0.yaml"
ARRAYS = ("image", "valid", "labels", "instances", "weights")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with running_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


# --------------------------------------------------------------------------- helpers
def run_flow(
    script: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
    return subprocess.run(
        [sys.executable, str(ROOT / "flows" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
    )


def assert_same_store(path: Path, ref: Path) -> None:
    """Every array equal bit for bit (and the same dtypes), the same class statistics."""
    a, b = SceneStore.open(path), SceneStore.open(ref)
    assert set(a.meta["arrays"]) == set(b.meta["arrays"])
    compared = 0
    for name in ARRAYS:
        assert a.has(name) == b.has(name), name
        if not a.has(name):
            continue
        x, y = np.asarray(a.array(name)[...]), np.asarray(b.array(name)[...])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name} differs in {int((x != y).sum())} elements"
        compared += 1
    assert compared >= 4
    # the same graph reduces in the same order on any scheduler: statistics equal exactly
    assert Fingerprint.from_dict(a.meta["fingerprint"]) == Fingerprint.from_dict(
        b.meta["fingerprint"]
    )


def units_done(store: Path, array: str) -> int:
    """Write units of ``array`` recorded finished, read without opening the store for writing."""
    try:
        marks = zarr.open_array(store=str(store / "_segflow" / "progress" / array), mode="r")
        return int(np.count_nonzero(marks[...]))
    except (FileNotFoundError, KeyError):
        return 0  # the stage has not started yet


# --------------------------------------------------------------------------- tests
def test_flows_run_through_the_address(
    cluster: LoopbackCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ingest (--dask-address) and prepare ($SEGFLOW_DASK_ADDRESS) on the external workers."""
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    cluster.ensure_workers(2)
    cfg = load_config(PIPELINE)
    assert cfg.ingest is not None and cfg.ingest.labels is not None
    flow_dir = tmp_path / "flow"  # the flows run here, the workers in cluster.folder
    flow_dir.mkdir()
    image = os.path.relpath(ROOT / cfg.ingest.source, flow_dir)
    labels = os.path.relpath(ROOT / cfg.ingest.labels, flow_dir)

    before = cluster.stats()
    r = run_flow(
        "ingest.py",
        image,
        "--labels",
        labels,
        "--class-value",
        str(cfg.ingest.class_value),
        "--chunk",
        str(cfg.ingest.chunk),
        "--config",
        str(PIPELINE),
        "--out",
        "scene.zarr",  # relative: the workers must still write into flow_dir
        "--dask-address",
        cluster.address,
        cwd=flow_dir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mid = cluster.stats()
    r = run_flow(
        "prepare.py",
        "scene.zarr",
        "--config",
        str(PIPELINE),
        "--no-progress",
        cwd=flow_dir,
        env={ENV_ADDRESS: cluster.address},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    after = cluster.stats()

    # the ingest tasks ran in the worker processes; prepare kept both workers busy
    assert set(before) == set(mid) == set(after) and len(after) == 2
    ingest_seconds = sum(
        t - before[w].executing.get(prefix, 0.0)
        for w in mid
        for prefix, t in mid[w].executing.items()
        if "ingest_task" in prefix  # segflow.ingest._ingest_task
    )
    assert ingest_seconds > 0, (before, mid)
    assert all(after[w].executed > mid[w].executed for w in after), (mid, after)
    assert not (cluster.folder / "scene.zarr").exists()  # nothing written beside the workers

    # the same pipeline on the embedded default cluster
    ref = tmp_path / "ref.zarr"
    spec = IngestSpec.from_config(
        cfg.ingest.model_copy(
            update={
                "source": str(ROOT / cfg.ingest.source),
                "labels": str(ROOT / cfg.ingest.labels),
            }
        ),
        out=str(ref),
        classes=cfg.classes,
        ignore_index=cfg.ignore_index,
    )
    with dask_client() as client:
        ingest(spec, executor=client.get_executor())
        prepare_store(ref, cfg.prepare, client=client)
    assert_same_store(flow_dir / "scene.zarr", ref)


def test_raster_labels_prepare_through_the_embedded_client(tmp_path: Path) -> None:
    """Instances derived from raster labels on a Dask client: the same store as dask.compute.

    ``ensure_instances`` computes the instance ids and their count together (a tuple): on a
    client that once returned a list of futures and crashed every raster-label store.
    """
    cfg = load_config(ISBI_SLICE)
    ref, run = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    spec = IngestSpec.from_config(
        cfg.ingest.model_copy(
            update={
                "source": str(ROOT / cfg.ingest.source),
                "labels": str(ROOT / cfg.ingest.labels),
                "chunk": 128,  # 4 x 4 chunks: components merge across chunk edges
            }
        ),
        out=str(ref),
        classes=cfg.classes,
        ignore_index=cfg.ignore_index,
    )
    ingest(spec)
    shutil.copytree(ref, run)
    assert not SceneStore.open(ref).has("instances")

    expected = prepare_store(ref, cfg.prepare)  # no client: dask.compute
    with dask_client() as client:
        got = prepare_store(run, cfg.prepare, client=client)

    assert expected.instances == got.instances == "labels"
    count = SceneStore.open(run).array_params("instances")["count"]
    assert count > 100  # the cells of the slice
    assert count == SceneStore.open(ref).array_params("instances")["count"]
    assert got.class_counts == expected.class_counts and set(got.class_counts) == {0, 1}
    assert_same_store(run, ref)


def synthetic_scene(size: int, objects: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image and ``objects`` small touching/overlapping rectangles as instances."""
    rng = np.random.default_rng(6)
    inst = np.zeros((size, size), np.uint32)
    for i in range(1, objects + 1):
        r, c = rng.integers(0, size - 12, 2)
        h, w = rng.integers(4, 12, 2)
        inst[r : r + h, c : c + w] = i
    image = rng.integers(0, 255, (1, size, size), dtype=np.uint8)
    return image, inst


def test_worker_killed_mid_prepare(cluster: LoopbackCluster, tmp_path: Path) -> None:
    """SIGKILL one worker while the weight map is half written: same store as undisturbed."""
    cluster.ensure_workers(2)
    image, inst = synthetic_scene(2048, 3000)
    cfg = PrepareConfig()
    ref, run = tmp_path / "ref.zarr", tmp_path / "run.zarr"
    # 64-pixel chunks in 256-pixel shards: 64 write units (whole shards, one task each) over
    # about a thousand tasks; a unit recomputed after the kill rewrites its whole shard
    for path in (ref, run):
        write_scene(path, image, instances=inst, valid=image[0] != 7, chunk=64, shard=256)
    prepare_store(ref, cfg)  # undisturbed (Dask's local threads)
    total = len(SceneStore.open(run).grid)

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = prepare_store(run, cfg, client=cluster.client)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    victim = sorted(cluster.workers())[0]
    deadline = time.monotonic() + 240
    done = units_done(run, "weights")
    while done < total // 4 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        done = units_done(run, "weights")
    busy = cluster.client.run_on_scheduler(
        lambda dask_scheduler: {
            str(ws.name): len(ws.processing) for ws in dask_scheduler.workers.values()
        }
    )
    done_at_kill = units_done(run, "weights")
    running_at_kill = thread.is_alive()
    cluster.kill_worker(victim)
    thread.join(timeout=300)
    print(f"killed {victim} at {done_at_kill}/{total} weight units; processing {busy}")

    assert running_at_kill and 0 < done_at_kill < total, (done_at_kill, total)
    assert busy.get(victim, 0) > 0  # it had work in hand when it died
    assert not thread.is_alive(), "prepare did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    assert victim not in cluster.workers() and len(cluster.workers()) == 1
    assert units_done(run, "weights") == total and is_current(SceneStore.open(run), cfg)
    assert_same_store(run, ref)
