"""Shared fixtures: bundled samples, the optional ../shared/data, seeded RNGs, mounts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
SHARED = Path(os.environ.get("SEGFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def samples() -> Path:
    """The sample data bundled with the project (always present)."""
    return SAMPLES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set SEGFLOW_SHARED_DATA)")
    return SHARED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------- mounts
# A root process writes through permission bits, so only a read-only mount really refuses it,
# and only a small file system really fills up: the tests that need either mount one (as root,
# as on CI) and skip without.
def mount(target: Path, *, tmpfs_size: str | None = None, bind: Path | None = None,
          read_only: bool = False) -> bool:  # fmt: skip
    """Mount a ``tmpfs_size`` tmpfs, or ``bind`` (a directory), at ``target``; False if not root
    or the mount failed. ``read_only``: the mount refuses every write."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    if bind is not None:
        ok = _run("mount", "--bind", str(bind), str(target))
        return ok and (not read_only or _run("mount", "-o", "remount,bind,ro", str(target)))
    options = f"size={tmpfs_size}" + (",ro" if read_only else "")
    return _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target))


def unmount(target: Path) -> None:
    _run("umount", "-l", str(target))


@contextmanager
def mounted(target: Path, **how: object) -> Iterator[Path]:
    """:func:`mount` for the block (the test skips when it cannot mount), unmounted after."""
    if not mount(target, **how):  # type: ignore[arg-type]
        unmount(target)
        pytest.skip(f"needs root to mount {how} at {target}")
    try:
        yield target
    finally:
        unmount(target)


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def write_scene(
    path: Path,
    image: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    instances: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    chunk: int = 64,
    shard: int | None = None,
    georef: object = None,
    classes: tuple = (),
) -> object:
    """A complete scene store written from in-memory arrays, as ingest would, every array recorded."""
    from segflow.geometry import Window
    from segflow.io.store import SceneStore

    bands, h, w = image.shape
    store = SceneStore.create(
        path,
        bands=[f"b{i}" for i in range(bands)],
        height=h,
        width=w,
        dtype=image.dtype,
        chunk=chunk,
        shard=shard,
        classes=classes,
        georef=georef,  # type: ignore[arg-type]
    )
    arrays = {"image": image, "valid": np.ones((h, w), bool) if valid is None else valid}
    if labels is not None:
        store.create_array("labels", dtype=labels.dtype, fill_value=0)
        arrays["labels"] = labels
    if instances is not None:
        store.create_array("instances", dtype="uint32", fill_value=0)
        arrays["instances"] = instances.astype(np.uint32)
    whole = Window(0, 0, h, w)
    for name, data in arrays.items():
        store.write_window(name, whole, data)
        store.record_array(name, source="test")
    return store


# ----------------------------------------------------------------------------- kill -9
def kill_9(pid: int) -> None:
    """SIGKILL the command ``pid`` mid-run, as a user's ``kill -9`` does, then stop what it
    started (Prefect's temporary API server): a real kill -9 leaves that running (see
    docs/troubleshooting.md), a test must not leave it behind."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    os.kill(pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


# ----------------------------------------------------------------------------- files
def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (symlinks not followed): hashed
    before and after a command, it shows that nothing there was touched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def tiff_header_bomb(path: Path, *, side: int = 10**6, big: bool = False) -> Path:
    """A ~1 KB deflate (Big)TIFF of one strip whose header claims ``side`` x ``side`` 8-bit
    pixels: the header bomb the pixel budget refuses before reading."""
    data = zlib.compress(bytes(1 << 20), 9)  # 1 MiB of zeros in about a kilobyte
    # tag, type (3 SHORT, 4 LONG, 16 LONG8), value
    tags = [
        (256, 4, side),  # ImageWidth
        (257, 4, side),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: deflate
        (262, 3, 1),  # Photometric: min-is-black
        (273, 16 if big else 4, 0),  # StripOffsets (patched below)
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, side),  # RowsPerStrip: one strip
        (279, 16 if big else 4, len(data)),  # StripByteCounts
        (284, 3, 1),  # PlanarConfiguration
    ]
    fmt = {3: "H", 4: "I", 16: "Q"}
    if big:
        head = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
        data_off = 16 + 8 + 20 * len(tags) + 8
        ifd = struct.pack("<Q", len(tags))
        for tag, typ, value in tags:
            value = data_off if tag == 273 else value
            ifd += struct.pack("<HHQ", tag, typ, 1) + struct.pack("<" + fmt[typ], value).ljust(
                8, b"\0"
            )
        ifd += struct.pack("<Q", 0)
    else:
        head = b"II*\x00" + struct.pack("<I", 8)
        data_off = 8 + 2 + 12 * len(tags) + 4
        ifd = struct.pack("<H", len(tags))
        for tag, typ, value in tags:
            value = data_off if tag == 273 else value
            ifd += struct.pack("<HHI", tag, typ, 1) + struct.pack("<" + fmt[typ], value).ljust(
                4, b"\0"
            )
        ifd += struct.pack("<I", 0)
    path.write_bytes(head + ifd + data)
    return path


def mosaic_geotiff(chip: Path, out: Path, *, size: int = 2048) -> Path:
    """A ``size`` x ``size`` tiled GeoTIFF of ``chip`` mirror-tiled (benchmarks'
    make_big_geotiff), with 256-pixel blocks."""
    import rasterio

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_big_geotiff import mosaic_block

    with rasterio.open(chip) as src:
        profile, pixels = src.profile, src.read()
    profile.update(width=size, height=size, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(mosaic_block(pixels, 0, 0, size, size))
    return out


# ------------------------------------------------------------------------ object storage
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real S3-compatible server (moto_server) on loopback for the whole session."""
    from tests._s3 import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(
    s3_server: object,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> Iterator[str]:
    """A fresh bucket on the loopback server, this test's environment pointing at it;
    ``s3://bucket``. Afterwards, no log record (any level) and nothing the test printed to
    stdout or stderr holds the secret key."""
    import logging

    from tests._s3 import SECRET, S3Server

    assert isinstance(s3_server, S3Server)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    bucket = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    yield s3_server.create_bucket(bucket)
    out, err = capfd.readouterr()
    sys.stdout.write(out)  # shown again with the test's report
    sys.stderr.write(err)
    assert SECRET not in caplog.text, "a log record holds the secret key"
    assert SECRET not in out + err, "the output holds the secret key"
