"""flows/_warm_api.py: the temporary Prefect API server the one-flow commands start first.

It is started before Prefect is imported, so where an API is configured must be read without
Prefect (environment, active profile), and Prefect's own answer, once imported, has the last
word: the server then goes unused and is stopped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location(
    "segflow_flows_warm_api", ROOT / "flows" / "_warm_api.py"
)
assert _spec is not None and _spec.loader is not None
warm_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(warm_api)


@pytest.fixture
def prefect_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No API in the environment; profiles read from ``tmp_path/profiles.toml``."""
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_HOME"):
        monkeypatch.delenv(name, raising=False)
    profiles = tmp_path / "profiles.toml"
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    return profiles


def test_api_configured_reads_the_environment_and_the_active_profile(
    prefect_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not warm_api._api_configured()  # no profiles file: Prefect's defaults
    prefect_env.write_text("this is [not toml")
    assert not warm_api._api_configured()
    prefect_env.write_text(
        'active = "remote"\n'
        '[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    assert warm_api._api_configured()
    prefect_env.write_text('[profiles.ephemeral]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n')
    assert not warm_api._api_configured()  # no active profile: Prefect uses its defaults
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert warm_api._api_configured()
    prefect_env.write_text(
        'active = "remote"\n'
        '[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n'
    )
    monkeypatch.setenv("PREFECT_PROFILE", "local")  # the environment picks the profile
    assert not warm_api._api_configured()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert warm_api._api_configured()


_SCRIPT = """
import os, sys
import psutil
sys.path.insert(0, sys.argv[1])
import _warm_api
_warm_api._wait_healthy = lambda proc, url: True  # the server's start-up is not this test's
_warm_api.warm_prefect_api()
started = len(psutil.Process().children())
with _warm_api.prefect_api():
    from prefect.settings import get_current_settings
    s = get_current_settings()
    print(started, len(psutil.Process().children()), s.api.url, s.flows.heartbeat_frequency)
"""


def _warm_in(cwd: Path, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ROOT / "flows")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_warm_server_runs_the_flow_without_heartbeats(prefect_env: Path, tmp_path: Path) -> None:
    """No API anywhere: the command's own server on loopback, and no heartbeat thread (whose
    one-second sleeps held up the end of every run)."""
    started, _, url, heartbeat = _warm_in(tmp_path, dict(os.environ))
    assert started == "1" and url.startswith("http://127.0.0.1:") and heartbeat == "None"


def test_api_set_where_only_prefect_looks_stops_the_warm_server(
    prefect_env: Path, tmp_path: Path
) -> None:
    """An API in ./prefect.toml is seen once Prefect is imported: that API is used, with its
    heartbeats, and the server started for nothing is gone before the flow runs."""
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    started, running, url, heartbeat = _warm_in(tmp_path, dict(os.environ))
    assert (started, running) == ("1", "0")
    assert url == "http://127.0.0.1:9/api" and heartbeat != "None"


def test_api_in_the_profile_starts_no_server(prefect_env: Path, tmp_path: Path) -> None:
    prefect_env.write_text(
        'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    started, running, url, _ = _warm_in(tmp_path, dict(os.environ))
    assert (started, running, url) == ("0", "0", "http://127.0.0.1:9/api")


def test_temporary_servers_turned_off_stop_the_warm_server(
    prefect_env: Path, tmp_path: Path
) -> None:
    """A profile that turns Prefect's temporary server off gets Prefect's own answer (no API:
    its error), not the command's server."""
    prefect_env.write_text(
        'active = "off"\n[profiles.off]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "false"\n'
    )
    started, running, url, _ = _warm_in(tmp_path, dict(os.environ))
    assert (started, running, url) == ("1", "0", "None")


_LOADING = """
import sys, time
import psutil
sys.path.insert(0, sys.argv[1])
import _warm_api
_warm_api.warm_prefect_api()
print(psutil.Process().children()[0].pid, flush=True)
time.sleep(60)  # still loading, before run_cli installs its SIGTERM handler
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_command_killed_while_loading_takes_its_server_with_it(
    prefect_env: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM before the command's own handler runs the exit hooks; SIGKILL (or the OOM
    killer) leaves the server its parent-death signal."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", _LOADING, str(ROOT / "flows")], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    server = psutil.Process(int(proc.stdout.readline()))
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    psutil.wait_procs([server], timeout=30)
    assert not server.is_running()
