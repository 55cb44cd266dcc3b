"""deploy/prefect.yaml really runs: a Prefect server, a process worker, `prefect deploy`, a run.

Everything goes through the project's own ``prefect`` command line, as a user would type it,
against a real ``prefect server start`` on a free port with a temporary PREFECT_HOME. The
server runs without its scheduler so the nightly pipeline deployment never starts here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import rasterio
import torch
import yaml

from segflow.config import ClassDef
from segflow.train.checkpoint import build_meta, save_checkpoint
from segflow.train.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deploy/prefect.yaml"
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "segflow-process"
CHIP = "data/samples/spacenet_atlanta/sample_geotiff.tif"  # relative: resolved by the pull step
CLASSES = (ClassDef(id=0, name="background"), ClassDef(id=1, name="building", color="#ff3030"))
CFG = ModelConfig(arch="unet", in_channels=1, out_channels=2, features=8, depth=2, num_res_units=0)


@dataclass(frozen=True)
class Stack:
    api: str
    env: dict[str, str]
    logs: Path


def _deployments() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((ROOT / PREFECT_FILE).read_text())
    return {d["name"]: d for d in doc["deployments"]}


def _checkpoint(path: Path) -> Path:
    """A freshly initialised one-band U-Net checkpoint (the outputs need not be good)."""
    torch.manual_seed(0)
    meta = build_meta(CFG, bands=("gray",), mean=[457.0], std=[263.0], tile=256, classes=CLASSES)
    save_checkpoint(path, build_model(CFG), meta)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:  # the child keeps its own handle
        return subprocess.Popen(
            [PREFECT, *args],
            cwd=log.parent,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with everything it spawned
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it after 5 s.

    An idle `prefect worker start` may sit on a single SIGTERM (it turns it into a graceful
    SIGINT that can go unanswered), hence the deadline.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):  # also children left after the leader exited
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _cli(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [PREFECT, *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (
        f"prefect {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n"
        + _tail(stack.logs / "worker.log")
    )
    return r


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`prefect server start` + the process work pool + `prefect worker start`, torn down after."""
    logs = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(logs / "home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",  # pick the run up at once (default: every 10 s)
        PREFECT_LOGGING_LEVEL="INFO",
        SEGFLOW_REPO=str(ROOT),  # the pull step's working directory
        COLUMNS="200",  # rich wraps CLI output at 80 columns otherwise
    )
    stack = Stack(api=api, env=env, logs=logs)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        serve = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
        server = _start([*serve, "--no-ui", "--no-scheduler"], env, logs / "server.log")
        procs.append(server)
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "prefect server exited\n" + _tail(logs / "server.log")
            assert time.monotonic() < deadline, "prefect server not healthy in 120 s\n" + _tail(
                logs / "server.log"
            )
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        _cli(stack, "work-pool", "create", POOL, "--type", "process")
        procs.append(_start(["worker", "start", "--pool", POOL], env, logs / "worker.log"))
        yield stack
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_prefect_yaml_entrypoints_take_their_parameters() -> None:
    """Every deployment's entrypoint loads and accepts its default parameters; paths exist."""
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    deps = _deployments()
    assert {"segment-region", "evaluate", "pipeline-nightly", "segment-collection"} <= set(deps)
    for dep in deps.values():
        path, func = dep["entrypoint"].split(":")
        flow: Flow[..., Any] = load_flow_from_entrypoint(
            f"{ROOT / path}:{func}", use_placeholder_flow=False
        )
        flow.validate_parameters(dep["parameters"])
        assert dep["work_pool"]["name"] == POOL
    assert (ROOT / deps["segment-region"]["parameters"]["image"]).is_file()
    assert (ROOT / deps["evaluate"]["parameters"]["reference"]).is_file()
    assert (ROOT / deps["pipeline-nightly"]["parameters"]["config_path"]).is_file()
    (sched,) = deps["pipeline-nightly"]["schedules"]
    CronSchedule(cron=sched["cron"], timezone=sched["timezone"])


def test_deploy_and_run_segment_region(prefect_stack: Stack, tmp_path: Path) -> None:
    """`prefect deploy --all`, then a worker run of segment-region writes a georeferenced COG."""
    from rio_cogeo.cogeo import cog_validate

    stack = prefect_stack
    _cli(stack, "--no-prompt", "deploy", "--prefect-file", PREFECT_FILE, "--all", timeout=180)

    nightly = httpx.get(f"{stack.api}/deployments/name/pipeline/pipeline-nightly", timeout=10)
    nightly.raise_for_status()
    (sched,) = nightly.json()["schedules"]
    want = _deployments()["pipeline-nightly"]["schedules"][0]
    assert sched["active"]
    assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == (
        want["cron"],
        want["timezone"],
    )

    model = _checkpoint(tmp_path / "model")
    out = tmp_path / "mask.tif"
    # flat parameters: each -p overrides one default (null turns an output off)
    gpkg = tmp_path / "mask.gpkg"
    params = {
        "image": CHIP,
        "model": str(model),
        "out": str(out),
        "tile": 256,
        "polygons": str(gpkg),
        "quicklook": None,
    }
    r = _cli(
        stack,
        "deployment",
        "run",
        "segment_region/segment-region",
        *[a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")],
        "--watch",
        "--watch-timeout",
        "240",
        timeout=300,
    )
    found = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert found, r.stdout
    run = httpx.get(f"{stack.api}/flow_runs/{found.group(1)}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{r.stdout}\n" + _tail(
        stack.logs / "worker.log"
    )

    assert out.is_file()
    with rasterio.open(ROOT / CHIP) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs
        assert dst.transform == src.transform
        assert (dst.width, dst.height) == (src.width, src.height)
    assert cog_validate(str(out))[0]
    assert gpkg.is_file() and not (tmp_path / "mask.png").exists()
