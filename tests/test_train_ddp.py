"""DDP under torchrun (2 CPU ranks, gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import isbi_crop, make_store
from test_train_loop import tiny_config

from segflow.train.loop import train


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> list[Path]:
    d = tmp_path_factory.mktemp("ddp")
    return [make_store(d / f"{i}.zarr", *isbi_crop(samples, i, 64), chunk=32) for i in range(3)]


def _torchrun(cfg: dict[str, Any], out: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    script = out.parent / f"{out.name}_ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        import torch
        from safetensors.torch import save_file
        from segflow.train.loop import train
        cfg = json.loads({json.dumps(json.dumps(cfg))})
        res = train(cfg, out_dir={str(out)!r}, device="cpu")
        rank = int(os.environ["RANK"])
        sd = {{k: v.contiguous() for k, v in res.model.state_dict().items()}}
        save_file(sd, os.path.join({str(out)!r}, f"rank{{rank}}.safetensors"))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", str(script)],
        capture_output=True, text=True, env=env, timeout=300)


def _compare(stores: list[Path], tmp_path: Path, norm: str) -> tuple[float, float, bool]:
    cfg = tiny_config(stores, steps=3, batch_size=4, val_interval=3, deterministic=False,
                      loss={"name": "ce"}, augment={"flips": True, "rot90": True})
    cfg["model"] = {**cfg["model"], "norm": norm}
    torch.set_num_threads(1)
    single = train(cfg, out_dir=tmp_path / f"single_{norm}", device="cpu")
    out = tmp_path / f"ddp_{norm}"
    out.mkdir()
    proc = _torchrun(cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    same_ranks = all(torch.equal(r0[k], r1[k]) for k in r0)
    assert single.model is not None
    ref = single.model.state_dict()
    wdiff = max(float((r0[k].float() - ref[k].float()).abs().max()) for k in r0)
    la = json.loads((tmp_path / f"single_{norm}" / "metrics.json").read_text())["train_loss"]
    lb = json.loads((out / "metrics.json").read_text())["train_loss"]
    ldiff = max(abs(a - b) for a, b in zip(la, lb, strict=True))
    return ldiff, wdiff, same_ranks


def test_ddp_matches_single_process(stores: list[Path], tmp_path: Path) -> None:
    ldiff, wdiff, same = _compare(stores, tmp_path, "none")
    print(f"DDP 2 ranks vs 1 process, no norm: max loss diff {ldiff:.2e}, max weight diff {wdiff:.2e}")
    assert same
    assert ldiff < 1e-5 and wdiff < 1e-5


@pytest.mark.slow
def test_ddp_batchnorm_difference(stores: list[Path], tmp_path: Path) -> None:
    """With BatchNorm on CPU each rank normalises with its own half-batch statistics."""
    ldiff, wdiff, same = _compare(stores, tmp_path, "batch")
    print(f"DDP 2 ranks vs 1 process, BatchNorm: max loss diff {ldiff:.2e}, weight diff {wdiff:.2e}")
    assert same


def test_ddp_bn_recalibration(stores: list[Path], tmp_path: Path) -> None:
    """Every rank recomputes the BatchNorm statistics over the same patches and ends with the
    same ones (a rank that skipped it would hang the others or keep different buffers)."""
    cfg = tiny_config(stores, steps=2, batch_size=4, val_interval=2, deterministic=False,
                      loss={"name": "ce"}, bn_recalibration={"patches": 6, "patch": 32})
    out = tmp_path / "ddp_recal"
    out.mkdir()
    proc = _torchrun(cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(int(r0[k]) == 2 for k in r0 if k.endswith("num_batches_tracked"))  # 4 + 2
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["step"] for r in hist] == [2] and hist[-1]["bn_recalibrated"] is True
