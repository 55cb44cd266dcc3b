"""Run many command lines of flows/*.py quickly: import once, fork one child per command.

    python tests/_flow_runner.py CASES.json RESULTS.json

``CASES.json`` is a list of ``{"id", "script", "argv", "env"}``; each case runs in a forked
child exactly as ``python SCRIPT ARGV...`` would (``__main__``, its own stderr file), so a
table of hostile command lines costs the imports once instead of once per case. Writes
``[{"id", "status", "stderr", "seconds"}]``. Used by tests/test_hostile_inputs.py.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_flow(script: str) -> ModuleType:
    """``flows/SCRIPT`` imported as a module (not ``__main__``): its parser, flow and helpers."""
    spec = importlib.util.spec_from_file_location(
        f"segflow_flow_{Path(script).stem}", ROOT / "flows" / script
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _preload() -> None:
    """Import what every flow imports, once, before any fork (no threads are started)."""
    sys.path[:0] = [str(ROOT / "flows"), str(ROOT)]
    import _common  # noqa: F401  (the flows' environment set-up)
    import monai.networks.nets  # noqa: F401  (models are built on first use: 3 s of imports)
    import prefect  # noqa: F401
    import rasterio  # noqa: F401
    import torch  # noqa: F401

    import segflow.ingest
    import segflow.prepare
    import segflow.segment
    import segflow.train.loop  # noqa: F401

    # the flow modules themselves (not as __main__): Prefect initialises its settings and
    # plugins on the first flow decorator, ~3 s that every child would otherwise repeat
    for script in sorted((ROOT / "flows").glob("[a-z]*.py")):
        runpy.run_path(str(script), run_name="_preload")


def _child(case: dict, err_path: str) -> None:
    # a command ends by running its exit hooks (segflow.runtime.exit_now): only its own, not
    # those this process inherited from the runner (they would, e.g., remove its folders)
    atexit._clear()
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    null = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(null, 1)
    os.dup2(fd, 2)
    os.environ.update(case.get("env") or {})
    sys.argv = [case["script"], *case["argv"]]
    code: object = 0
    try:
        runpy.run_path(case["script"], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    _stop_children()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _stop_children() -> None:
    """Stop what the case started (Prefect's temporary API server): ``os._exit`` skips the
    exit hooks that would, and each would otherwise outlive the test holding ~230 MB. The
    server is killed, as flows/_common.py's exit hook kills a warm server no flow used:
    terminated while still starting, uvicorn prints a traceback into the case's stderr."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=10)


def main(cases_path: str, results_path: str) -> None:
    _preload()
    cases = json.loads(Path(cases_path).read_text())
    results = []
    tmp = tempfile.mkdtemp(prefix="segflow-runner-")  # no exit-time finalizer a child could run
    try:
        for case in cases:
            err_path = os.path.join(tmp, "stderr.txt")
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(case, err_path)
            _, status = os.waitpid(pid, 0)
            results.append(
                {
                    "id": case["id"],
                    "status": os.waitstatus_to_exitcode(status),
                    "stderr": Path(err_path).read_text(errors="replace"),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
