"""What every flow's command line shares: environment, error reporting, progress bars.

Flows stay thin: parse arguments, call ``segflow``, report artifacts. Every failure the user
can act on (a ``SegflowError``, an operating-system error such as a full disk or a read-only
directory, running out of memory) becomes one ``error:`` line on stderr and exit status 2;
SIGINT and SIGTERM stop the command (exit 130 / 143) with one line saying how to resume.
``--debug`` (any command) or ``SEGFLOW_DEBUG=1`` shows tracebacks and Prefect's own logs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

if "--debug" in sys.argv[1:]:  # every command takes it; argparse never sees it
    sys.argv.remove("--debug")
    os.environ["SEGFLOW_DEBUG"] = "1"
DEBUG = os.environ.get("SEGFLOW_DEBUG", "") not in ("", "0")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Dask's log level, read here and in every worker an embedded cluster spawns (they re-import
# the flow): its start-up and shut-down chatter is not the user's to read, its errors are
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if DEBUG else "error")
# a failing flow makes Prefect log its traceback (60-110 lines) before our one error line
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING" if DEBUG else "CRITICAL")
# a loaded machine can take longer than Prefect's default 20 s to start its temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# segflow reads each source block once: GDAL's block cache (5 % of RAM) only adds memory
os.environ.setdefault("GDAL_CACHEMAX", "256")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python flows/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from segflow.errors import describe_failure, options_named  # noqa: E402
from segflow.runtime import exit_now, tune_malloc  # noqa: E402

tune_malloc()  # large freed blocks kept for reuse, in threads too: 2.6x faster CPU forwards


class Terminated(KeyboardInterrupt):  # SIGTERM, raised like Ctrl-C: every stage unwinds
    pass


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated


_QUIET_LOGGERS = "py.warnings distributed prefect tornado asyncio tifffile rasterio".split()  # noqa: SIM905


def _quiet_logging() -> None:
    """Warnings and errors of segflow on the terminal; the libraries' only with ``--debug``."""
    logging.basicConfig(
        level=logging.DEBUG if DEBUG else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if DEBUG:
        return
    logging.captureWarnings(True)  # library warnings (rasterio, dask) are not the user's to fix
    # tifffile's and GDAL's own complaints about a damaged file: its error line says it
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run_cli(main: Callable[[], Any], *, flags: Mapping[str, str] | None = None) -> None:
    """Run ``main``; every failure becomes one ``error:`` line (exit 2) unless ``--debug``.
    Messages name options as this command's ``flags`` (option -> flag, where not ``--name``).
    """
    _quiet_logging()
    signal.signal(signal.SIGTERM, _terminate)
    status = 0
    try:
        with options_named("cli", flags=flags):
            main()
    except Terminated:
        print("terminated: re-run the same command to resume", file=sys.stderr)
        status = 143
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        status = 130
    except SystemExit as stop:  # argparse's usage errors, a command's own exit status
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except Exception as err:
        if DEBUG:
            raise
        message, status = describe_failure(err)
        print(f"error: {message}", file=sys.stderr)
    if main.__module__ != "__main__":  # called in process (a test, a notebook): theirs to end
        raise SystemExit(status)
    exit_now(status)  # without the interpreter's 1-2 s teardown of torch, MONAI, Prefect


def tqdm_progress(total: int, desc: str) -> Any:
    """A terminal progress bar (``tqdm``), updated by ``bar.update(n)``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=None, file=sys.stderr)
