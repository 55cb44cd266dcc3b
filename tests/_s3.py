"""A real S3-compatible server on loopback for the tests: moto's standalone ``moto_server``
(an HTTP server speaking the S3 REST API, in memory), started and stopped by the tests.

The credentials are made up; the secret is distinctive so a test can grep every log for it.
A :class:`ByteCounter` is a TCP proxy in front of the server that counts the bytes the server
sent, to prove a window read is ranged requests and not a download.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The test secret: no log, record or error line of the suite's S3 runs may contain it.
SECRET = "segflow-test-SECRET-7f3a9c"
KEY_ID = "segflowtestkey"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_server_command() -> list[str] | None:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else None


@dataclass
class S3Server:
    """A running ``moto_server`` and the environment that points clients at it."""

    endpoint: str
    proc: subprocess.Popen[bytes]

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (a plain PUT: moto accepts unsigned requests); ``s3://name``."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass
        return f"s3://{name}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


#: Requests an authenticating server answers before it checks credentials: the set-up of
#: :func:`authorised_bucket` (user, access key, policy, bucket).
SETUP_REQUESTS = 4


def start_s3_server(log: Path, *, authenticate: bool = False) -> S3Server:
    """``moto_server`` on a free loopback port; with ``authenticate``, every request after
    the first :data:`SETUP_REQUESTS` must be signed with an IAM access key it issued."""
    cmd = moto_server_command()
    if cmd is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
    port = free_port()
    env = dict(os.environ)
    if authenticate:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_REQUESTS)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return S3Server(endpoint, proc)
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not start: see {log}")


class ByteCounter:
    """A loopback TCP proxy to ``target_port`` that counts the bytes the server sends back."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self._listener.close()


@contextlib.contextmanager
def byte_counter(server: S3Server) -> Iterator[ByteCounter]:
    port = int(server.endpoint.rsplit(":", 1)[1])
    counter = ByteCounter(port)
    try:
        yield counter
    finally:
        counter.close()


def authorised_bucket(server: S3Server, bucket: str) -> dict[str, str]:
    """On an authenticating server: an IAM user allowed everything, its access key and
    ``bucket`` (the :data:`SETUP_REQUESTS` unsigned requests); the environment that uses
    that key."""
    import json

    import boto3

    kw = {"endpoint_url": server.endpoint, "region_name": "us-east-1",
          "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}  # fmt: skip
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="segflow")
    key = iam.create_access_key(UserName="segflow")["AccessKey"]
    allow = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="segflow", PolicyName="all", PolicyDocument=json.dumps(allow))
    boto3.client("s3", **kw).create_bucket(Bucket=bucket)
    return {**server.env(), "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}  # fmt: skip
