"""Object storage and HTTP: URLs, credentials, identity, upload and download.

Every place that takes a path also takes a URL (DESIGN.md section 6a):

- ``s3://bucket/key`` (AWS S3 and S3-compatible servers: MinIO, Ceph, moto),
  ``gs://bucket/key`` (Google Cloud Storage) and ``http(s)://host/path`` (read only);
- GDAL's own virtual paths (``/vsicurl/...``, ``/vsis3/...``) for sources.

Pixels of remote rasters are read by GDAL's virtual file systems (ranged GETs, never a whole
download); objects are listed, stat'ed, written and read with `obstore` (Rust's
``object_store``: multipart uploads, retries), which FIELD-NOTES.md measured ~3x faster than
s3fs for Zarr I/O.

Credentials, endpoint and region come only from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_NO_SIGN_REQUEST=YES`` for public buckets; ``GOOGLE_*`` for GCS), which
obstore reads itself; :func:`configure_gdal` derives the few settings GDAL spells differently
(it does not read ``AWS_ENDPOINT_URL``). Dask workers started from the same environment see
the same values; nothing is passed through configs, and :func:`redact` removes secret values
from any message before it is shown.

Examples
--------
>>> is_url("s3://bucket/scene.tif"), is_url("/data/scene.tif"), is_url("file:///d/x.tif")
(True, False, False)
>>> ObjectURL.parse("s3://bucket/a/b.tif")
ObjectURL(scheme='s3', bucket='bucket', key='a/b.tif')
>>> str(ObjectURL.parse("s3://bucket/a").join("b.tif"))
's3://bucket/a/b.tif'
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segflow.errors import ConfigError, SourceError

__all__ = [
    "OBJECT_SCHEMES",
    "ObjectInfo",
    "ObjectURL",
    "RemoteError",
    "check_location",
    "check_prefix",
    "configure_gdal",
    "delete",
    "download",
    "exists",
    "gdal_path",
    "head",
    "is_url",
    "object_url",
    "object_identity",
    "open_ranged",
    "read_bytes",
    "read_range",
    "redact",
    "remove_prefix",
    "staged_upload",
    "stat",
    "upload",
    "zarr_store",
]

#: Schemes whose objects segflow reads and writes (``http(s)``: read only).
OBJECT_SCHEMES = ("s3", "gs", "http", "https")
_WRITABLE = ("s3", "gs")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: Environment variables whose values never appear in a message.
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_SERVICE_ACCOUNT_KEY")


class RemoteError(SourceError):
    """An object cannot be found, read or written (one line, never a secret)."""


def _scheme(value: str | os.PathLike[str]) -> str | None:
    m = _URL.match(str(value))
    return m.group(1).lower() if m else None


def is_url(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` names something other than a local file: a URL (``file://`` is a
    local path) or a GDAL virtual path (``/vsicurl/...``)."""
    text = str(value)
    scheme = _scheme(text)
    return (scheme is not None and scheme != "file") or text.startswith("/vsi")


def check_location(value: str | os.PathLike[str], *, what: str, write: bool = False) -> str:
    """``value`` as given when it is a local path or a supported URL; else a clear error.

    Parameters
    ----------
    value
        A path or URL.
    what
        What it is, for the message (``"scene store"``, ``"--out"``).
    write
        The location is written: HTTP URLs and GDAL virtual paths are refused.

    Raises
    ------
    ConfigError
        An unsupported scheme (``ftp://``, ``s3a://``...), or a read-only one for ``write``.
    """
    text = str(value)
    scheme = _scheme(text)
    if scheme is None or scheme == "file":
        if text.startswith("/vsi") and write:
            raise ConfigError(
                f"{what}: GDAL virtual path {text!r} cannot be written: use s3://, gs:// or a "
                "local path"
            )
        return text
    if scheme not in OBJECT_SCHEMES:
        raise ConfigError(
            f"{what}: unsupported URL scheme {scheme!r} in {redact(text)!r}: use a local path, "
            "s3://, gs://, http:// or https://"
        )
    if write and scheme not in _WRITABLE:
        raise ConfigError(
            f"{what}: {redact(text)!r} is read only ({scheme}): write to s3://, gs:// or a "
            "local path"
        )
    if not ObjectURL.parse(text).bucket:
        raise ConfigError(f"{what}: {text!r} names no bucket or host: e.g. s3://bucket/key")
    return text.rstrip("/")  # one spelling of a prefix: keys are joined with "/"


@dataclass(frozen=True, slots=True)
class ObjectURL:
    """An object (or prefix) URL split into ``scheme``, ``bucket`` (host for HTTP), ``key``."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectURL:
        scheme = _scheme(url)
        if scheme is None:
            raise ConfigError(f"not a URL: {url!r}: e.g. s3://bucket/key")
        rest = url[len(scheme) + 3 :]
        bucket, _, key = rest.partition("/")
        return cls(scheme, bucket, key.strip("/"))

    def join(self, *names: str) -> ObjectURL:
        """The URL of ``names`` below this one."""
        key = "/".join(p.strip("/") for p in (self.key, *names) if p.strip("/"))
        return ObjectURL(self.scheme, self.bucket, key)

    @property
    def name(self) -> str:
        """The last part of the key (a file name)."""
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD request tells of an object: its size, ETag and last-modified time."""

    url: str
    size: int
    etag: str
    last_modified: str


# ------------------------------------------------------------------------------ clients
def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("YES", "TRUE", "1", "ON")


@functools.cache
def _store_for(scheme: str, bucket: str, fingerprint: str, prefix: str | None = None) -> Any:
    """One obstore client per bucket and environment (``fingerprint``: the settings'
    hash, so a changed environment gets a new client; obstore reads the values itself)."""
    from obstore.store import GCSStore, HTTPStore, S3Store

    if scheme == "s3":
        endpoint = _endpoint()
        client = {"allow_http": True} if endpoint and endpoint.startswith("http://") else {}
        config: dict[str, Any] = {}
        if _truthy("AWS_NO_SIGN_REQUEST"):
            config["skip_signature"] = True
        if endpoint:
            config["endpoint"] = endpoint
        return S3Store(bucket, prefix=prefix, config=config or None, client_options=client or None)  # type: ignore[arg-type]
    if scheme == "gs":
        return GCSStore(bucket, prefix=prefix)
    return HTTPStore.from_url(f"{scheme}://{bucket}", client_options={"allow_http": True})


def _settings_fingerprint() -> str:
    names = sorted(k for k in os.environ if k.startswith(("AWS_", "GOOGLE_")))
    text = "\n".join(f"{k}={os.environ[k]}" for k in names)
    return hashlib.sha256(text.encode()).hexdigest()


def _store(url: ObjectURL) -> Any:
    return _store_for(url.scheme, url.bucket, _settings_fingerprint())


def zarr_store(url: str, *, read_only: bool = False) -> Any:
    """A Zarr store rooted at prefix ``url`` (zarr's obstore-backed ``ObjectStore``)."""
    from zarr.storage import ObjectStore

    u = ObjectURL.parse(check_location(url, what="Zarr store", write=not read_only))
    client = _store_for(u.scheme, u.bucket, _settings_fingerprint(), u.key or None)
    return ObjectStore(client, read_only=read_only)


def configure_gdal() -> None:
    """Give GDAL the endpoint settings it spells differently from the AWS tools.

    GDAL reads ``AWS_ACCESS_KEY_ID`` & co. itself but not ``AWS_ENDPOINT_URL``: an endpoint
    there becomes ``AWS_S3_ENDPOINT`` (host:port), ``AWS_HTTPS`` and path-style addressing
    (S3-compatible servers rarely serve virtual-hosted buckets). Environment variables the
    user set win. ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` stops GDAL from listing the
    whole "directory" of an object on open. ``AWS_NO_SIGN_REQUEST=YES`` GDAL reads as it is.
    Called before every remote open (cheap, idempotent), so Dask workers configure
    themselves from their own environment.
    """
    derived: dict[str, str | None] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    endpoint = _endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        derived["AWS_S3_ENDPOINT"] = host.rstrip("/")
        derived["AWS_HTTPS"] = "NO" if scheme == "http" else "YES"
        derived["AWS_VIRTUAL_HOSTING"] = "FALSE"
    from rasterio.env import set_gdal_config

    for name in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
        derived.setdefault(name, None)  # no endpoint now: drop what an earlier call derived
    for name, value in derived.items():
        # GDAL configuration options of this process, not environment variables: they follow
        # the environment on every call, and a child process (a Dask worker) derives its own
        # from its environment instead of inheriting stale ones. A variable the user set wins.
        set_gdal_config(name, None if name in os.environ else value)


def object_url(value: str) -> str:
    """The URL of a GDAL virtual path (``/vsis3/b/k`` -> ``s3://b/k``); URLs as given."""
    for prefix, scheme in (("/vsis3/", "s3://"), ("/vsigs/", "gs://"), ("/vsicurl/", "")):
        if value.startswith(prefix):
            return scheme + value[len(prefix) :]
    if value.startswith("/vsi"):
        raise ConfigError(
            f"GDAL virtual path {value!r} is not supported: use s3://, gs://, https:// or /vsicurl/"
        )
    return value


def gdal_path(url: str) -> str:
    """The GDAL virtual path of ``url`` (``/vsis3/``, ``/vsigs/``, ``/vsicurl/``)."""
    if url.startswith("/vsi"):
        return url
    u = ObjectURL.parse(url)
    if u.scheme in ("http", "https"):
        return f"/vsicurl/{url}"
    return f"/vsi{u.scheme}/{u.bucket}/{u.key}"


# ---------------------------------------------------------------------------- messages
def redact(text: str) -> str:
    """``text`` with every secret credential's value replaced by ``***``."""
    for name in _SECRETS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _reason(err: BaseException) -> str:
    """One short line on why an object request failed (obstore's text is many lines)."""
    text = str(err)
    lower = text.lower()
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else type(err).__name__
    if "status: 403" in text or "403 forbidden" in lower or "accessdenied" in lower:
        return (
            "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
        )
    if "nosuchbucket" in lower:
        return "no such bucket: check the bucket name"
    if isinstance(err, FileNotFoundError) or "404" in first:
        return "no such object (or bucket): check the bucket and key"
    gave_up = re.search(r"after \d+ retries", lower) and "status:" not in lower
    if gave_up or any(w in lower for w in ("connect", "dns error", "timed out")):
        return "cannot reach the endpoint: check AWS_ENDPOINT_URL and the network"
    return redact(first)[:160]


def _fail(action: str, url: str, err: BaseException) -> RemoteError:
    return RemoteError(f"cannot {action} {redact(url)!r}: {_reason(err)}")


# --------------------------------------------------------------------------- operations
def head(url: str) -> ObjectInfo:
    """Size, ETag and last-modified time of the object at ``url`` (one HEAD request)."""
    import obstore

    u = ObjectURL.parse(url)
    try:
        meta = obstore.head(_store(u), u.key)
    except Exception as err:
        raise _fail("read", url, err) from None
    return ObjectInfo(
        url=url,
        size=int(meta["size"]),
        etag=str(meta.get("e_tag") or "").strip('"'),
        last_modified=meta["last_modified"].isoformat(),
    )


def object_identity(url: str) -> str:
    """A hex digest that changes when the object does: of its URL, size, ETag and
    last-modified time (stage keys and ingest's "same source" rule; never a download)."""
    info = head(url)
    text = f"{url}\n{info.size}\n{info.etag}\n{info.last_modified}"
    return hashlib.sha256(text.encode()).hexdigest()


def stat(url: str) -> ObjectInfo | None:
    """:func:`head`, or ``None`` when no object is at ``url`` (a missing bucket or no
    access: an error)."""
    try:
        return head(url)
    except RemoteError as err:
        if "no such object" in str(err):
            return None
        raise


def exists(url: str) -> bool:
    """Whether an object is at ``url`` (missing bucket or no access: an error)."""
    return stat(url) is not None


def read_bytes(url: str) -> bytes:
    """The whole object (small objects only: JSON, markers, STAC Items)."""
    import obstore

    u = ObjectURL.parse(url)
    try:
        return bytes(obstore.get(_store(u), u.key).bytes())
    except Exception as err:
        raise _fail("read", url, err) from None


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of the object (one ranged GET)."""
    import obstore

    u = ObjectURL.parse(url)
    try:
        return bytes(obstore.get_range(_store(u), u.key, start=start, end=end))
    except Exception as err:
        raise _fail("read", url, err) from None


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over an object: each read is a ranged GET (obstore's
    reader, buffered), for libraries that read a file themselves (tifffile).

    The buffer is small (16 KiB): tifffile seeks to every directory and tile, and each seek
    refills it. Opening a 25 MiB pyramidal OME-TIFF then costs 0.3 MiB, not the 5 MiB a
    256 KiB buffer reads (tests/test_remote_sources.py measures a window's bytes).
    """

    def __init__(self, url: str, *, buffer_size: int = 16 * 1024) -> None:
        import obstore

        super().__init__()
        self.url = url
        self.name = ObjectURL.parse(url).name
        u = ObjectURL.parse(url)
        try:
            self._raw = obstore.open_reader(_store(u), u.key, buffer_size=buffer_size)
        except Exception as err:
            raise _fail("read", url, err) from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = self._raw.read() if size is None or size < 0 else self._raw.read(size)
        except Exception as err:
            raise _fail("read", self.url, err) from None
        return bytes(data)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


def open_ranged(url: str) -> RangedFile:
    """A :class:`RangedFile` over the object at ``url`` (opening reads its size: one HEAD)."""
    return RangedFile(url)


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` at ``url`` in one request (the object appears whole or not at all)."""
    import obstore

    u = ObjectURL.parse(url)
    try:
        obstore.put(_store(u), u.key, data)
    except Exception as err:
        raise _fail("write", url, err) from None


def upload(local: str | Path, url: str) -> None:
    """Upload a local file to ``url``; large files go in parts (multipart upload).

    S3 publishes an object only when its (multipart) upload completes, so a reader sees the
    old object or the new one, never a part: the object-store form of an atomic rename.
    """
    import obstore

    u = ObjectURL.parse(url)
    try:
        obstore.put(_store(u), u.key, Path(local))
    except Exception as err:
        raise _fail("write", url, err) from None


def download(url: str, local: str | Path) -> Path:
    """Copy the object at ``url`` to ``local`` (streamed; written under a temporary name)."""
    import obstore

    u = ObjectURL.parse(url)
    target = Path(local)
    tmp = target.with_name(f".{target.name}.download")
    try:
        result = obstore.get(_store(u), u.key)
        with open(tmp, "wb") as fh:
            for chunk in result:
                fh.write(chunk)
        os.replace(tmp, target)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise _fail("read", url, err) from None
    return target


def list_keys(url: str, *, limit: int | None = None) -> list[str]:
    """The keys below prefix ``url`` (recursively; the first ``limit`` only if given)."""
    import obstore

    u = ObjectURL.parse(url)
    prefix = u.key + "/" if u.key else None
    keys: list[str] = []
    try:
        for batch in obstore.list(_store(u), prefix, chunk_size=limit or 1000):
            keys.extend(o["path"] for o in batch)
            if limit is not None and len(keys) >= limit:
                return keys[:limit]
    except Exception as err:
        raise _fail("list", url, err) from None
    return keys


def check_prefix(url: str, *, what: str) -> bool:
    """Whether any object lies below prefix ``url``; fails now, in one line, if its bucket
    is missing or refuses us (one LIST request)."""
    try:
        return bool(list_keys(url, limit=1))
    except RemoteError as err:
        raise RemoteError(f"{what}: {err}") from None


def delete(url: str) -> None:
    """Delete the object at ``url`` (a missing one is fine)."""
    import obstore

    u = ObjectURL.parse(url)
    try:
        obstore.delete(_store(u), u.key)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise _fail("delete", url, err) from None


def remove_prefix(url: str) -> int:
    """Delete every object below prefix ``url``; returns how many."""
    import obstore

    u = ObjectURL.parse(url)
    keys = list_keys(url)
    if keys:
        try:
            obstore.delete(_store(u), keys)
        except Exception as err:
            raise _fail("delete", url, err) from None
    return len(keys)


@contextlib.contextmanager
def staged_upload(url: str) -> Iterator[Path]:
    """Yield a local temporary path named like ``url``; upload it there on success.

    Writers that need a local file (GDAL's COG driver, SQLite for GeoPackage) write here;
    the object appears at ``url`` only once complete. On an exception nothing is uploaded.
    """
    tmpdir = Path(tempfile.mkdtemp(prefix="segflow-upload-"))
    try:
        local = tmpdir / ObjectURL.parse(url).name
        yield local
        upload(local, url)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
