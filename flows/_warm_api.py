"""Prefect's temporary API server, started first thing by the commands that run one flow.

Without an API (no ``PREFECT_API_URL``), Prefect starts a temporary server at the flow's
first call and waits for it: 3 s on an idle 2-core machine once its database exists, 5-7 s
beside this command's own imports. The command starts the same server process itself (the
command of Prefect's ``SubprocessASGIServer``) first thing, so it comes up while the command
imports torch and MONAI, checks the request and loads the model; the flow then runs with
``PREFECT_API_URL`` set to it. Going through Prefect's own ``SubprocessASGIServer`` object
instead would import the server's application (1.4-1.9 s on the command's critical path).
Where the server does not come up, the flow runs as before and Prefect starts its own.

The server is started before this process imports Prefect (0.5-0.8 s): it reads the same
settings sources itself (environment, profile, ``prefect.toml``), as every ``prefect``
command does. An API set in the environment or in the active profile is seen without
Prefect; one set anywhere else is seen once Prefect is imported, and the server is then
stopped unused. With this server, the flow sends no heartbeats: they tell a lasting server
that a run died, and this one ends with the run (Prefect's heartbeat thread also held up
the end of every run by up to a second).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any

from segflow.runtime import exit_on_sigterm, parent_death_signal

#: What Prefect's SubprocessASGIServer sets for its temporary server (no UI).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}  # fmt: skip


def warm_prefect_api() -> None:
    """Start Prefect's temporary API server now, in the background, when no API is set.

    Called first thing by a command that will run a flow: under ``__name__ == "__main__"``
    (not where its module is imported by tests or re-imported by the processes of an embedded
    Dask cluster), or, for train run so, once its arguments say a flow will run (not under
    torchrun).
    The flow then runs in :func:`prefect_api`; the server stops when the command exits, as
    Prefect's own would.
    """
    global _ready
    spec = importlib.util.find_spec("prefect")
    if _api_configured() or spec is None or spec.origin is None:
        return
    exit_on_sigterm()  # a kill while the command loads still stops the server
    try:
        port = _free_port()
        app_dir = os.path.dirname(os.path.dirname(spec.origin))  # as prefect.__module_path__.parent
        proc = subprocess.Popen(_server_command(app_dir, port), env={**os.environ, **_SERVER_ENV},
                                preexec_fn=parent_death_signal())  # fmt: skip
    except Exception:  # a Prefect without these settings starts its server itself
        return
    used: list[bool] = []
    atexit.register(_stop, proc, used)

    def ready() -> contextlib.AbstractContextManager[Any]:
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            temporary_settings,
        )

        # an API set where only Prefect looks (prefect.toml, .env), or temporary servers
        # turned off: Prefect's own answer (that API, or its error)
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            _stop(proc, used)
            return contextlib.nullcontext()
        used.append(True)
        url = f"http://127.0.0.1:{port}/api"
        if not _wait_healthy(proc, url):
            return contextlib.nullcontext()  # it died: Prefect starts its own
        return temporary_settings(
            updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        )

    _ready = ready


def prefect_api() -> contextlib.AbstractContextManager[Any]:
    """The context to run the flow in: the API of the server :func:`warm_prefect_api`
    started (once it answers; no heartbeats), or, where it started none, Prefect's choice."""
    return _ready() if _ready is not None else contextlib.nullcontext()


_ready: Callable[[], contextlib.AbstractContextManager[Any]] | None = None


def _api_configured() -> bool:
    """Whether ``PREFECT_API_URL`` is set in the environment or in the active profile, read
    without importing Prefect (its profiles file: ``PREFECT_PROFILES_PATH``, default
    ``$PREFECT_HOME/profiles.toml``; the active profile: ``PREFECT_PROFILE`` or the file's
    ``active``)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = os.environ.get("PREFECT_HOME", os.path.join(os.path.expanduser("~"), ".prefect"))
    path = os.environ.get("PREFECT_PROFILES_PATH", os.path.join(home, "profiles.toml"))
    try:
        with open(os.path.expanduser(path), "rb") as f:
            profiles = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # no profiles file: Prefect's defaults (no API)
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")  # none: the defaults
    settings = profiles.get("profiles", {}).get(active, {})
    return bool(isinstance(settings, dict) and settings.get("PREFECT_API_URL"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # loopback only, as Prefect's own temporary server
        return int(s.getsockname()[1])


def _server_command(app_dir: str, port: int) -> list[str]:
    """The command Prefect's SubprocessASGIServer runs (its ``_run_uvicorn_command``)."""
    return [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip


def _stop(proc: subprocess.Popen[Any], used: list[bool]) -> None:
    """Stop the warm server at exit (after Prefect's own exit hooks have sent their logs);
    kill one no flow used (the command failed its checks): stopped politely while starting,
    uvicorn prints a traceback after the ``error:`` line."""
    if proc.poll() is not None:
        return
    if used:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
            return
    proc.kill()
    proc.wait()


def _wait_healthy(proc: subprocess.Popen[Any], url: str) -> bool:
    """Wait until the server at ``url`` answers ``/health``; False if it died or never did."""
    import httpx

    wait_s = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    deadline = time.monotonic() + wait_s
    with httpx.Client() as client:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return True
            time.sleep(0.05)
    return False
