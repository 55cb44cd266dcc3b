"""Run PyQGIS checks in the system Python, where Debian's QGIS lives (the venv cannot import it).

QGIS's bindings are built for ``/usr/bin/python3`` and the system GDAL (3.6 with QGIS 3.22 on
Debian 12), so a test hands a short script to that interpreter as a subprocess and reads one
JSON document back. The subprocess gets an offscreen Qt platform, a throwaway ``HOME`` (QGIS
writes a profile there) and none of this process's Python, GDAL or PROJ variables, so it sees
what a user's QGIS sees and leaves nothing behind. Where ``/usr/bin/python3`` cannot import
``qgis.core`` (CI, most machines) the test is skipped, with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

SYSTEM_PYTHON = Path("/usr/bin/python3")
TIMEOUT_S = 180
_MARK = "@@segflow-qgis-result@@"
_DROP = ("PYTHON", "VIRTUAL_ENV", "GDAL_", "PROJ_", "CPL_", "QGIS_", "QT_", "LD_")

_PRELUDE = """\
import json, sys
from qgis.core import QgsApplication
ARGS = json.loads(sys.argv[1])
app = QgsApplication([], False)
app.initQgis()
"""
_EPILOGUE = f"""
print({_MARK!r} + json.dumps(RESULT), flush=True)
app.exitQgis()
"""


def _env(home: Path) -> dict[str, str]:
    """This process's environment without what would change the system Python or its GDAL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
    runtime = home / "runtime"
    runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    env.update(
        HOME=str(home), XDG_RUNTIME_DIR=str(runtime), QT_QPA_PLATFORM="offscreen", LC_ALL="C.UTF-8"
    )
    return env


@functools.cache
def qgis_missing() -> str | None:
    """Why PyQGIS cannot run here, or ``None`` when ``/usr/bin/python3`` imports qgis.core.

    Asked once per test session.
    """
    if not SYSTEM_PYTHON.is_file():
        return f"{SYSTEM_PYTHON} not found (PyQGIS needs the system Python)"
    try:
        with tempfile.TemporaryDirectory(prefix="segflow-qgis-") as home:
            probe = subprocess.run(
                [str(SYSTEM_PYTHON), "-c", "import qgis.core"],
                env=_env(Path(home)),
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=TIMEOUT_S,
            )
    except subprocess.TimeoutExpired:
        return f"{SYSTEM_PYTHON} -c 'import qgis.core' timed out"
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{SYSTEM_PYTHON} cannot import qgis.core (install QGIS): {why}"
    return None


def run_qgis(body: str, home: Path, **args: Any) -> Any:
    """Run ``body`` in the system Python with QGIS started; return the ``RESULT`` it sets.

    ``body`` sees ``app`` (the started ``QgsApplication``) and ``ARGS`` (``args``, through
    JSON), and must set ``RESULT`` to something JSON can hold. Skips the calling test where
    PyQGIS is not installed; fails it, with QGIS's output, where the script fails.
    """
    reason = qgis_missing()
    if reason is not None:
        pytest.skip(reason)
    script = _PRELUDE + textwrap.dedent(body) + _EPILOGUE
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", script, json.dumps(args)],
        env=_env(home),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=TIMEOUT_S,
    )
    for line in proc.stdout.splitlines():  # QGIS may crash on exit: the result came before
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    pytest.fail(f"the PyQGIS script failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
