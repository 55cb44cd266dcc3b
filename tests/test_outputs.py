"""Output planning, the one-writer lock and failure lines (segflow.outputs, segflow.errors).

Unit tests against the rules; then real processes: a second segment_region on the same
``--out`` is refused at once while the first runs, a lock left by ``kill -9`` does not block
the next run, and a read-only input scene store is segmented without being written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import kill_9, mounted, tree_digest

from segflow.errors import ConfigError, StoreError, describe_failure
from segflow.outputs import (
    LockedError,
    OutputRecord,
    check_output_directory,
    check_unlocked,
    file_stamp,
    lock_path,
    output_lock,
    plan_outputs,
    remove_output,
    sidecar_paths,
)

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "samples" / "spacenet_atlanta" / "sample_geotiff.tif"


# ----------------------------------------------------------------------------- plan_outputs
def test_plan_returns_absolute_paths_of_the_outputs_given(tmp_path: Path) -> None:
    plan = plan_outputs(
        {"out": tmp_path / "m.tif", "polygons": None, "quicklook": str(tmp_path / "q.png")},
        inputs=[tmp_path / "scene.tif"],
    )
    assert plan == {"out": tmp_path.resolve() / "m.tif", "quicklook": tmp_path.resolve() / "q.png"}
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing


@pytest.mark.parametrize(
    ("outputs", "inputs", "match"),
    [
        ({"out": "scene.tif"}, ["scene.tif"], "input"),
        ({"out": "store.zarr/x.tif"}, ["store.zarr"], "input"),
        ({"out": "m.tif", "polygons": "m.tif"}, [], "both name"),
        ({"out": "m.tif", "probabilities": "./sub/../m.tif"}, [], "both name"),
        ({"out": "missing/m.tif"}, [], "does not exist"),
        ({"out": "existing.tif"}, [], "--overwrite"),
        ({"out": "a_dir"}, [], "directory"),
        ({"out": "m.tif", "polygons": "m.tif.aux.xml"}, [], "sidecar"),
        ({"polygons": "m.tif.aux.xml", "out": "m.tif"}, [], "sidecar"),
        ({"out": "m.tif"}, ["m.tif.aux.xml"], "input"),  # its sidecar would overwrite it
    ],
)
def test_plan_refuses(tmp_path: Path, outputs: dict, inputs: list, match: str) -> None:
    os.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "existing.tif").write_bytes(b"user data")
    with pytest.raises(ConfigError, match=match):
        plan_outputs(outputs, inputs=inputs)
    assert (tmp_path / "existing.tif").read_bytes() == b"user data"


def test_an_output_goes_with_its_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "m.tif"
    assert sidecar_paths(out) == [tmp_path / "m.tif.aux.xml"]
    for p in (out, *sidecar_paths(out), tmp_path / "other.tif.aux.xml"):
        p.write_bytes(b"x")
    remove_output(out)
    assert [p.name for p in tmp_path.iterdir()] == ["other.tif.aux.xml"]
    remove_output(out)  # nothing there: fine
    (tmp_path / "m.tif.aux.xml").write_bytes(b"stale")  # a stale sidecar alone is no output
    assert plan_outputs({"out": out}, inputs=[])["out"] == out.resolve()


def test_a_directory_output_may_not_contain_an_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="input"):
        plan_outputs({"work": tmp_path}, inputs=[tmp_path / "scene.tif"], directories=("work",))


def test_existing_file_is_replaced_only_when_recorded_unchanged_or_overwrite(
    tmp_path: Path,
) -> None:
    f = tmp_path / "m.tif"
    f.write_bytes(b"earlier output")
    record = OutputRecord({str(f.resolve()): file_stamp(f) or ""})
    assert plan_outputs({"out": f}, inputs=[], record=record)["out"] == f.resolve()
    f.write_bytes(b"edited by the user since")  # its stamp changes: no longer ours
    os.utime(f, ns=(1, 1))
    with pytest.raises(ConfigError, match="--overwrite"):
        plan_outputs({"out": f}, inputs=[], record=record)
    assert plan_outputs({"out": f}, inputs=[], overwrite=True)["out"] == f.resolve()


def test_unwritable_directory_is_refused_even_for_root(tmp_path: Path) -> None:
    with mounted(tmp_path / "ro", tmpfs_size="64k", read_only=True) as ro:
        with pytest.raises(ConfigError, match="read-only"):
            plan_outputs({"out": ro / "m.tif"}, inputs=[])
        with pytest.raises(ConfigError, match="read-only"):
            check_output_directory("out", ro / "train" / "run1")


def test_output_directory_check(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert check_output_directory("out", tmp_path / "a" / "b") == tmp_path.resolve() / "a" / "b"
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_directory("out", tmp_path / "f")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_directory("out", tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match="overlaps an input"):
        check_output_directory("out", tmp_path / "s.zarr" / "train", inputs=[tmp_path / "s.zarr"])


# ----------------------------------------------------------------------------- locks
_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from segflow.outputs import output_lock
with output_lock({path!r}):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_is_exclusive_names_the_holder_and_survives_kill_9(tmp_path: Path) -> None:
    out = tmp_path / "m.tif"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD.format(root=str(ROOT), path=str(out))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            check_unlocked(out)
        with pytest.raises(LockedError, match="another run is writing"), output_lock(out):
            pass
        assert time.perf_counter() - t0 < 1.0  # refused at once, never waits
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # the killed run's lock file is left behind ...
    with output_lock(out) as lock:  # ... and taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()  # removed on release
    check_unlocked(out)


# ----------------------------------------------------------------------------- failure lines
@pytest.mark.parametrize(
    ("err", "fragment"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/d/m.tif"), "no space left"),
        (PermissionError(errno.EACCES, "Permission denied", "/d/m.tif"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/d"), "read-only"),
        (RuntimeError("TIFFWriteEncodedTile: No space left on device"), "no space left"),
        (MemoryError(), "out of memory"),
        (StoreError("store 'x' is incomplete: run ingest"), "store 'x' is incomplete"),
    ],
)
def test_describe_failure_is_one_line_with_status_2(err: BaseException, fragment: str) -> None:
    message, status = describe_failure(err)
    assert status == 2 and "\n" not in message and fragment in message.lower()


def test_wrapped_os_error_and_internal_errors() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/d/x")
        except OSError as inner:
            raise ValueError("codec failed") from inner
    except ValueError as wrapped:
        assert describe_failure(wrapped)[0].startswith("no space left")
    message, status = describe_failure(KeyError("boom"))
    assert status == 1 and "--debug" in message and "KeyError" in message


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2048 x 2048 mosaic of the chip and a small checkpoint: a run that lasts seconds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_big_geotiff import mosaic_block
    from test_segment import CFG, _checkpoint

    from segflow.train.models import build_model

    d = tmp_path_factory.mktemp("big")
    with rasterio.open(CHIP) as src:
        profile, chip = src.profile, src.read()
    profile.update(width=2048, height=2048, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(d / "big.tif", "w", **profile) as dst:
        dst.write(mosaic_block(chip, 0, 0, 2048, 2048))
    torch.manual_seed(0)
    return {
        "image": d / "big.tif",
        "model": _checkpoint(d / "ck", build_model(CFG).eval(), mean=400.0, std=300.0),
    }


def _segment_cmd(image: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "flows" / "segment_region.py"),
        "--image", str(image), "--model", str(model), "--out", str(out),
        "--tile", "256", "--batch-size", "2", *extra,
    ]  # fmt: skip


def test_a_second_run_is_refused_while_the_first_writes(
    big_run: dict[str, Path], tmp_path: Path
) -> None:
    """Two segment_region runs on one ``out`` at once (threads): the second is refused at
    once, naming the first, and the first finishes undisturbed."""
    import threading

    from segflow.segment import SegmentRequest, segment_region

    out = tmp_path / "m.tif"
    req = SegmentRequest(
        image=str(big_run["image"]), model=str(big_run["model"]), out=str(out), tile=256,
        batch_size=2,
    )  # fmt: skip
    writing, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:  # the first run pauses mid-inference
        writing.set()
        release.wait(120)

    result: dict[str, object] = {}

    def first() -> None:
        try:
            result["report"] = segment_region(req, progress=hold)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert writing.wait(120), result
        t0 = time.perf_counter()
        with pytest.raises(LockedError, match=f"another run is writing .*pid {os.getpid()}"):
            segment_region(req)
        assert time.perf_counter() - t0 < 5  # at once, not after the first run
        assert not out.exists()
    finally:
        release.set()
        thread.join(300)
    assert "error" not in result, result
    assert out.is_file() and not lock_path(out).exists()


@pytest.mark.slow  # four command lines with their Prefect servers: over a minute
def test_second_run_on_the_same_out_is_refused_and_a_killed_lock_does_not_block(
    big_run: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.tif"
    cmd = _segment_cmd(big_run["image"], big_run["model"], out)
    # the first run averages 4 flips over overlapping windows: long enough to be raced
    slow = [*cmd, "--tta", "flips", "--mode", "gaussian"]
    first = subprocess.Popen(slow, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not lock_path(out).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be raced"
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        kill_9(first.pid)
        first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: another run is writing") and f"pid {first.pid}" in lines[0]
    assert not out.exists()
    assert lock_path(out).exists()  # left by the kill -9
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert out.is_file() and not lock_path(out).exists()
    # re-running the finished command replaces its own recorded output without --overwrite
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_read_only_scene_store_is_segmented_without_being_written(
    tmp_path: Path, samples: Path
) -> None:
    """A scene store as the image: predictions go to the work store, the store is untouched."""
    from test_segment import CFG, _checkpoint

    from segflow.ingest import IngestSpec, ingest
    from segflow.segment import SegmentRequest, segment_region
    from segflow.train.models import build_model

    src = tmp_path / "src.zarr"
    ingest(IngestSpec(source=str(CHIP), out=str(src)))
    with mounted(tmp_path / "ro.zarr", bind=src, read_only=True) as ro:
        before = tree_digest(src)
        torch.manual_seed(0)
        ck = _checkpoint(tmp_path / "ck", build_model(CFG).eval(), mean=400.0, std=300.0)
        from_store = segment_region(
            SegmentRequest(image=str(ro), model=str(ck), out=str(tmp_path / "a.tif"), tile=256)
        )
        from_tiff = segment_region(
            SegmentRequest(image=str(CHIP), model=str(ck), out=str(tmp_path / "b.tif"), tile=256)
        )
        with pytest.raises(ConfigError, match="read-only file system"):
            segment_region(
                SegmentRequest(
                    image=str(ro), model=str(ck), out=str(tmp_path / "c.tif"), into_store=True
                )
            )
    assert tree_digest(src) == before
    assert from_store.class_pixels == from_tiff.class_pixels
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert not (tmp_path / "c.tif").exists()


def test_disk_full_leaves_an_earlier_output_untouched(
    big_run: dict[str, Path], tmp_path: Path
) -> None:
    """A re-run into a full disk fails with one line and the finished COG stays as it was."""
    from segflow.segment import SegmentRequest, segment_region

    with mounted(tmp_path / "full", tmpfs_size="3m") as full:
        shutil.copy(CHIP, full / "scene.tif")  # a small image: its outputs fit
        out = full / "m.tif"
        # the earlier, finished run (in process: only the failing one needs a command line)
        segment_region(
            SegmentRequest(
                image=str(full / "scene.tif"),
                model=str(big_run["model"]),
                out=str(out),
                tile=256,
                batch_size=2,
            )
        )
        kept = out.read_bytes()
        filler = full / "filler"
        with open(filler, "wb") as fh:  # fill what is left but a few kB
            free = shutil.disk_usage(full).free
            fh.write(b"\0" * max(0, free - 8192))
        bad = subprocess.run(
            _segment_cmd(
                full / "scene.tif",
                big_run["model"],
                out,
                "--probabilities",
                str(full / "p.tif"),
                "--tile",
                "512",
            ),
            capture_output=True,
            text=True,
        )
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and "no space left" in lines[0], bad.stderr
        assert out.read_bytes() == kept
        assert not (full / "p.tif").exists()


def test_a_tree_output_is_replaced_only_when_recorded(tmp_path: Path) -> None:
    """A directory written whole (an OME-Zarr) is the user's unless this command wrote it."""
    from segflow.outputs import OutputRecord, file_stamp, plan_outputs

    tree = tmp_path / "m.ome.zarr"
    tree.mkdir()
    (tree / ".zattrs").write_text("{}")
    with pytest.raises(ConfigError, match="already exists"):
        plan_outputs({"ome_zarr": str(tree)}, inputs=[], trees=("ome_zarr",))
    record = OutputRecord({str(tree.resolve()): str(file_stamp(tree))})
    assert plan_outputs({"ome_zarr": str(tree)}, inputs=[], trees=("ome_zarr",), record=record)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        plan_outputs({"ome_zarr": str(tmp_path / "f")}, inputs=[], trees=("ome_zarr",))
