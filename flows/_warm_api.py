"""Prefect's temporary API server, started first thing by the commands that run one flow.

Without an API (no ``PREFECT_API_URL``), Prefect starts a temporary server at the flow's
first call and waits for it: 3 s on an idle 2-core machine once its database exists, 5-7 s
beside this command's own imports. The command starts the same server process itself (the
command of Prefect's ``SubprocessASGIServer``) first thing, so it comes up while the command
imports torch and MONAI, checks the request and loads the model; the flow then runs with
``PREFECT_API_URL`` set to it. Going through Prefect's own ``SubprocessASGIServer`` object
instead would import the server's application (1.4-1.9 s on the command's critical path).
Where the server does not come up, the flow runs as before and Prefect starts its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

#: What Prefect's SubprocessASGIServer sets for its temporary server (no UI).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}  # fmt: skip


def warm_prefect_api() -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """Start Prefect's temporary API server now, in the background, when no API is set.

    Returns the function to call before the flow: it waits until the server answers and
    returns the context to run the flow in (the API set to that server). The server stops
    when the command exits, as Prefect's own would.
    """
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext
    try:
        port = _free_port()
        env = {**os.environ, **_SERVER_ENV,
               **get_current_settings().to_environment_variables(exclude_unset=True)}  # fmt: skip
        proc = subprocess.Popen(_server_command(str(prefect.__module_path__.parent), port), env=env)
    except Exception:  # a Prefect without these settings starts its server itself
        return contextlib.nullcontext
    used: list[bool] = []
    atexit.register(_stop, proc, used)

    def ready() -> contextlib.AbstractContextManager[Any]:
        from prefect.settings import temporary_settings

        used.append(True)
        url = f"http://127.0.0.1:{port}/api"
        if not _wait_healthy(proc, url):
            return contextlib.nullcontext()  # it died: Prefect starts its own
        return temporary_settings(updates={PREFECT_API_URL: url})

    return ready


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
