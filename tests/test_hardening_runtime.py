"""Runtime hardening: servers on loopback only; SIGTERM stops a command at once.

``flows/ingest.py``, ``flows/prepare.py`` and ``flows/segment_region.py`` run as command lines
(as a user runs them: no ``PREFECT_API_URL``, so each starts Prefect's temporary API server;
no Dask address, so ingest and prepare start the embedded Dask cluster) while the test polls
the listening TCP sockets of each command's whole process tree (psutil). Every listener must
be on 127.0.0.0/8 or ::1. The Dask dashboard of the embedded cluster once listened on 0.0.0.0
and [::], and the in-process worker's HTTP endpoint still does unless it is told where to bind.

Ingest and prepare run on the bundled ISBI slice with raster class labels and no instances
(prepare derives the objects through the embedded Dask client: the command pair from the
Hardening issue, which crashed in prepare); segment_region runs on the bundled SpaceNet
GeoTIFF with a tiny untrained checkpoint. A fast test checks the embedded Dask cluster in
process (with and without worker processes).

SIGTERM (``kill``, a scheduler's time-out) mid-run ends a command within seconds with exit
status 143 and one ``terminated:`` line, its resumable partial work kept: ingest once let
Prefect swallow the signal while its Zarr writer threads ran on.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from segflow.config import ClassDef
from segflow.io.store import SceneStore
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT / "data" / "samples" / "isbi2012" / "train"
ATLANTA = ROOT / "data" / "samples" / "spacenet_atlanta"
#: Seconds between two looks at the process tree's sockets.
POLL_S = 0.05


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket of a watched process tree."""

    pid: int
    name: str
    address: str
    port: int
    #: the command's own process (not a child such as Prefect's API server)
    root: bool

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.address.split("%")[0])  # drop an IPv6 zone
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


@dataclass
class Watched:
    """A finished command and every listener seen while it ran."""

    returncode: int
    stdout: str
    stderr: str
    listeners: set[Listener] = field(default_factory=set)
    polls: int = 0

    def summary(self) -> str:
        return ", ".join(sorted(f"{x.name}[{x.pid}] {x.address}:{x.port}" for x in self.listeners))


def listeners_of(pid: int) -> set[Listener]:
    """The listening TCP sockets of process ``pid`` and all its descendants, now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    found: set[Listener] = set()
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:  # exited between the listing and the look
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr:
                found.add(Listener(proc.pid, name, c.laddr.ip, c.laddr.port, proc.pid == pid))
    return found


def run_watched(script: str, *args: str, cwd: Path, timeout: float = 300) -> Watched:
    """Run ``flows/SCRIPT ARGS`` and poll its process tree's listeners until it exits."""
    env = {k: v for k, v in os.environ.items()}
    # the defaults a user gets: Prefect's temporary server, the embedded Dask cluster, and
    # no configured interfaces
    for name in (
        "PREFECT_API_URL",
        "SEGFLOW_DASK_ADDRESS",
        "SEGFLOW_DASK_HOST",
        "SEGFLOW_DASK_DASHBOARD",
    ):
        env.pop(name, None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    out, err = cwd / f"{script}.stdout", cwd / f"{script}.stderr"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "flows" / script), *args],
            cwd=cwd,
            env=env,
            stdout=fo,
            stderr=fe,
        )
        watched = Watched(returncode=-1, stdout="", stderr="")
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{script} ran longer than {timeout} s")
                watched.listeners |= listeners_of(proc.pid)
                watched.polls += 1
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    watched.returncode = proc.returncode
    watched.stdout, watched.stderr = out.read_text(), err.read_text()
    return watched


def assert_loopback_only(w: Watched, what: str, *, own: bool) -> None:
    """Every listener on loopback; at least one seen (by the command itself when ``own``)."""
    assert w.returncode == 0, f"{what} failed: {w.stderr[-3000:]}"
    assert w.listeners, f"{what}: no listener seen in {w.polls} polls: the test saw nothing"
    exposed = [x for x in w.listeners if not x.loopback]
    assert not exposed, f"{what} listened beyond loopback: {w.summary()}"
    if own:  # the embedded Dask cluster's HTTP servers live in the command's own process
        assert any(x.root for x in w.listeners), f"{what}: no Dask server seen: {w.summary()}"


def test_loopback_listener_check_sees_an_exposed_socket() -> None:
    """The check itself: 0.0.0.0 and :: are exposed; 127.x, ::1 and mapped 127.x are not."""
    cases = {
        "0.0.0.0": False,
        "::": False,
        "192.0.2.2": False,
        "127.0.0.1": True,
        "127.3.2.1": True,
        "::1": True,
        "::ffff:127.0.0.1": True,
        "fe80::1%eth0": False,
    }
    for address, loopback in cases.items():
        assert Listener(1, "x", address, 1, True).loopback is loopback, address


@pytest.mark.parametrize("processes", [False, True])
def test_embedded_dask_cluster_listens_on_loopback_only(processes: bool) -> None:
    """The embedded cluster's scheduler, workers, dashboard and worker HTTP endpoints.

    The fast counterpart of the command-line test below: the servers this process (and its
    worker processes) open while a ``dask_client`` is up, all on loopback, and the dashboard
    among them.
    """
    from segflow.cluster import dask_client

    before = listeners_of(os.getpid())
    with dask_client(n_workers=1, threads_per_worker=1, processes=processes) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        seen = listeners_of(os.getpid()) - before
        dashboard = int(client.dashboard_link.split(":")[2].split("/")[0])
    w = Watched(returncode=0, stdout="", stderr="", listeners=seen, polls=1)
    assert_loopback_only(w, f"dask_client(processes={processes})", own=True)
    assert dashboard in {x.port for x in seen}, w.summary()
    if processes:  # the scheduler and the worker process talk TCP: both listen, on loopback
        assert any(not x.root for x in seen), w.summary()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained one-band U-Net checkpoint for the SpaceNet panchromatic chip."""
    cfg = ModelConfig(
        arch="unet", in_channels=1, out_channels=2, features=4, depth=2, num_res_units=0
    )
    classes = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building"))
    meta = build_meta(cfg, bands=("pan",), mean=[450.0], std=[250.0], tile=256, classes=classes)
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    save_checkpoint(path, build_model(cfg).eval(), meta)
    return path


@pytest.mark.slow  # three command lines with their Prefect servers: about a minute
def test_commands_listen_on_loopback_only(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """ingest, prepare (raster labels, embedded Dask) and segment_region: loopback only."""
    ingest = run_watched(
        "ingest.py",
        str(ISBI / "images" / "0.png"),
        "--labels",
        str(ISBI / "labels" / "0.png"),
        "--class-map",
        '{"0": 1, "255": 0}',
        "--chunk",
        "128",
        "--out",
        "i.zarr",
        cwd=tmp_path,
    )
    assert_loopback_only(ingest, "flows/ingest.py", own=True)

    prepare = run_watched("prepare.py", "i.zarr", "--no-progress", cwd=tmp_path)
    assert_loopback_only(prepare, "flows/prepare.py", own=True)
    store = SceneStore.open(tmp_path / "i.zarr")
    assert store.has("weights") and store.meta.get("fingerprint")
    assert (store.array_params("instances") or {}).get("derived_from") == "labels"

    segment = run_watched(
        "segment_region.py",
        "--image",
        str(ATLANTA / "sample_geotiff.tif"),
        "--model",
        str(tiny_checkpoint),
        "--out",
        "mask.tif",
        "--tile",
        "256",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert_loopback_only(segment, "flows/segment_region.py", own=False)
    assert (tmp_path / "mask.tif").is_file()
    # Prefect's temporary API server (a child process) was among those seen
    assert any(not x.root for x in segment.listeners), segment.summary()


# --------------------------------------------------------------------------- SIGTERM
@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096 x 4096 deflate GeoTIFF mosaic of the SpaceNet chip (23 MB, made in a second)."""
    import rasterio

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_big_geotiff import mosaic_block

    path = tmp_path_factory.mktemp("sigterm") / "big.tif"
    with rasterio.open(ATLANTA / "sample_geotiff.tif") as src:
        profile, chip = src.profile, src.read()
    profile.update(width=4096, height=4096, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mosaic_block(chip, 0, 0, 4096, 4096))
    return path


def terminate_mid_run(cmd: list[str], started: Path, *, cwd: Path) -> tuple[int, str, float]:
    """Run ``cmd``, SIGTERM it one second after ``started`` appears; (status, stderr, seconds
    from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, "the command ended before it could be stopped"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_ingest_at_once(big_tiff: Path, tmp_path: Path) -> None:
    """SIGTERM mid-ingest (16384 units of 32 px, about 3.5 s of writing; 4096 units of 64 px
    now take 0.9 s, less than the wait): exit 143 within seconds with one line, the resumable
    ``.partial`` store kept, nothing at ``--out`` and no lock left."""
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, str(ROOT / "flows" / "ingest.py"), str(big_tiff), "--out", str(out),
           "--chunk", "32"]  # fmt: skip
    status, err, seconds = terminate_mid_run(cmd, tmp_path / "s.zarr.partial", cwd=tmp_path)
    assert status == 143, err
    assert err.strip().splitlines() == ["terminated: re-run the same command to resume"], err
    assert seconds < 15, seconds
    assert not out.exists() and (tmp_path / "s.zarr.partial").is_dir()
    assert not (tmp_path / "s.zarr.lock").exists()


@pytest.mark.slow  # a second command line with its Prefect server; ingest covers the handler
def test_sigterm_stops_segment_region_at_once(
    big_tiff: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.tif"
    cmd = [sys.executable, str(ROOT / "flows" / "segment_region.py"), "--image", str(big_tiff),
           "--model", str(tiny_checkpoint), "--out", str(out), "--tile", "256",
           "--device", "cpu"]  # fmt: skip
    status, err, seconds = terminate_mid_run(cmd, tmp_path / "m.tif.lock", cwd=tmp_path)
    assert status == 143, err
    assert err.strip().splitlines() == ["terminated: re-run the same command to resume"], err
    assert seconds < 15, seconds
    assert not out.exists() and not (tmp_path / "m.tif.lock").exists()
