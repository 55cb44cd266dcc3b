"""What every flow's command line shares: environment, error reporting, progress bars.

Flows stay thin: parse arguments, call ``segflow``, report artifacts. A ``SegflowError``
(or a Prefect-wrapped one) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# a loaded machine can take longer than Prefect's default 20 s to start its temporary API server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# segflow reads every source block once, in aligned windows: GDAL's block cache (5 % of RAM by
# default) only adds memory, so the command lines bound it
os.environ.setdefault("GDAL_CACHEMAX", "256")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python flows/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from segflow.errors import SegflowError  # noqa: E402
from segflow.runtime import tune_malloc  # noqa: E402

# every flow process (command line, Prefect worker, Dask worker importing a flow) keeps large
# freed blocks for reuse: CPU forward passes 2.6x faster (segflow.runtime)
tune_malloc()


def run_cli(main: Callable[[], Any]) -> None:
    """Run ``main``; turn segflow errors into one clear line and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines flood the terminal
    try:
        main()
    except SegflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


def tqdm_progress(total: int, desc: str) -> Any:
    """A terminal progress bar (``tqdm``), updated by ``bar.update(n)``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=None, file=sys.stderr)
