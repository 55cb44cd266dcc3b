"""deploy/slurm: the sbatch recipe's commands are ones flows/train.py and torchrun accept."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "train-multinode.sbatch"


def _load_train_flow() -> ModuleType:
    spec = importlib.util.spec_from_file_location("segflow_flow_train", ROOT / "flows" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(text: str) -> list[list[str]]:
    """The script's commands as token lists (comments dropped, continuation lines joined)."""
    logical = re.sub(r"\\\n", " ", text)
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = shlex.split(line, comments=True)
        while tokens and tokens[-1] in ("&", ";"):
            tokens.pop()
        if tokens:
            out.append(tokens)
    return out


def _train_invocations() -> list[tuple[list[str], list[str]]]:
    """(tokens before flows/train.py, flows/train.py's arguments) for every invocation."""
    found = []
    for tokens in _commands(SBATCH.read_text()):
        if "flows/train.py" in tokens:
            i = tokens.index("flows/train.py")
            found.append((tokens[:i], tokens[i + 1 :]))
    return found


def _check_exact_options(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Every ``--flag`` is spelled out in full (argparse would accept abbreviations)."""
    known = {o for action in parser._actions for o in action.option_strings}
    for a in args:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in known, f"{a} is not an option of {parser.prog}"


def test_sbatch_has_two_train_steps() -> None:
    calls = _train_invocations()
    assert len(calls) == 2, [" ".join(a) for _, a in calls]
    prepare, train = (args for _, args in calls)
    assert "--prepare-only" in prepare and "--no-prefect" in prepare
    assert {"--resume", "--no-prefect", "--out"} <= set(train)


@pytest.mark.parametrize("index", [0, 1])
def test_train_flags_are_accepted_by_flows_train(index: int) -> None:
    parser = _load_train_flow().parser()
    _, args = _train_invocations()[index]
    _check_exact_options(parser, args)
    ns = parser.parse_args(args)  # SystemExit on an unknown flag or a missing value
    assert ns.config == "$CONFIG" and ns.no_prefect


def test_torchrun_flags_are_accepted_by_torchrun() -> None:
    from torch.distributed.run import get_args_parser

    before, args = _train_invocations()[1]
    launcher = next(i for i, t in enumerate(before) if t.endswith("/torchrun"))
    assert before[0] == "srun"
    torchrun_args = before[launcher + 1 :]
    parser = get_args_parser()
    _check_exact_options(parser, torchrun_args)
    ns = parser.parse_args([*torchrun_args, "flows/train.py", *args])
    assert ns.rdzv_backend == "c10d"
    assert ns.nnodes == "$SLURM_NNODES" and ns.rdzv_endpoint == "$MASTER:$RDZV_PORT"
    assert ns.training_script == "flows/train.py" and ns.training_script_args == args


def test_sbatch_requeues_and_traps_the_warning_signal() -> None:
    text = SBATCH.read_text()
    directives = [ln.split(None, 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives
    signal = next(d for d in directives if d.startswith("--signal="))
    assert signal.startswith("--signal=B:USR1@")
    assert re.search(r"^trap requeue USR1$", text, re.M)
    assert re.search(r"^wait$", text, re.M)  # the trap runs only while bash waits


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


# ----------------------------------------------------------------------------- GPU workers
GPU_NODE = ROOT / "deploy" / "dask" / "gpu-node.sh"
KUBERNETES = ROOT / "deploy" / "dask" / "kubernetes.yaml"


def _dask_worker_options() -> set[str]:
    from distributed.cli.dask_worker import main as dask_worker

    return {opt for p in dask_worker.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_node_script_is_valid_bash_with_one_gpu_worker_per_device() -> None:
    subprocess.run(["bash", "-n", str(GPU_NODE)], check=True)
    text = GPU_NODE.read_text()
    line = next(ln for ln in text.splitlines() if "dask worker" in ln and "CUDA_VISIBLE" in ln)
    line += " " + text.splitlines()[text.splitlines().index(line) + 1]
    tokens = shlex.split(line.replace("\\", ""), comments=True)
    flags = {t for t in tokens if t.startswith("--")}
    assert flags <= _dask_worker_options(), flags - _dask_worker_options()
    assert "CUDA_VISIBLE_DEVICES=$i" in tokens and tokens[tokens.index("--resources") + 1] == "GPU=1"


def test_kubernetes_gpu_workers_declare_the_gpu_resource() -> None:
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}
    (container,) = docs["DaskWorkerGroup"]["spec"]["worker"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    assert args[:2] == ["dask", "worker"] and args[args.index("--resources") + 1] == "GPU=1"
    assert {a for a in args if a.startswith("--")} <= _dask_worker_options()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert docs["DaskWorkerGroup"]["spec"]["cluster"] == docs["DaskCluster"]["metadata"]["name"]


def _assignments(text: str, prefix: str) -> dict[str, str]:
    """``NAME=VALUE`` pairs of the MALLOC_ settings on the line starting with ``prefix``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(prefix) and "MALLOC_" in ln)
    return dict(t.split("=", 1) for t in shlex.split(line[len(prefix) :]))


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        (ROOT / "deploy" / "docker" / "Dockerfile.cpu", "ENV "),
        (ROOT / "deploy" / "docker" / "Dockerfile.cuda", "ENV "),
        (GPU_NODE, "export "),
    ],
)
def test_worker_environments_tune_malloc_as_segflow_does(path: Path, prefix: str) -> None:
    """Workers started from the images or the GPU-node script get the same glibc settings as
    the workers segflow starts itself (a Dask nanny would otherwise trim at 64 KiB)."""
    from segflow.runtime import malloc_environment

    expected = malloc_environment()
    if not expected:
        pytest.skip("glibc's settings: Linux only")
    assert _assignments(path.read_text(), prefix) == expected
