"""moto's S3 server with its buckets on disk: killed (SIGKILL) and started again, it still has every
object it acknowledged, as a real object store would.

    python -m tests.durable_s3 --port 9000 --state /tmp/s3.pickle

The ``durable_s3`` fixture (import ``durable_s3_fixture``) runs one in a subprocess on 127.0.0.1 at a
free port, points the AWS environment at it (as ``tests.s3_server.s3_server`` does) and returns a
``DurableS3`` that can ``kill()`` it (SIGKILL) and ``start()`` it again on the same port and state;
it is killed at the end.

moto keeps its state in memory, and its request recorder (``MOTO_ENABLE_RECORDING``) cannot bring
objects back: it keeps no multipart bodies, and a replayed multipart upload gets a new upload id
(pyarrow writes every object as a multipart upload). So here each request that changes state (PUT,
POST, DELETE) runs alone, and before its response goes out the buckets are pickled (moto's keys
pickle their bytes) into a temporary file renamed over ``--state``. A kill in the middle of a request
loses that request only, which its client never saw acknowledged.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import run_simple

from tests.s3_server import S3Server, _free_port, point_aws_at

_WRITES = ("PUT", "POST", "DELETE")


def save(path: str) -> None:
    """Every S3 backend's buckets into ``path``, atomically."""
    state = {
        (account, partition): backend.buckets
        for account, partitions in s3_backends.items()
        for partition, backend in partitions.items()
    }
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
    os.replace(tmp, path)


def load(path: str) -> None:
    """The buckets ``save`` wrote, back into moto's backends."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        state = pickle.load(f)
    for (account, partition), buckets in state.items():
        s3_backends[account][partition].buckets.update(buckets)
        for name in buckets:
            s3_backends.bucket_accounts[name] = (partition, account)


class Durable:
    """WSGI middleware: a state-changing request runs alone and is on disk before it is answered."""

    def __init__(self, app, path: str):
        self.app, self.path, self.lock = app, path, threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in _WRITES:
            return self.app(environ, start_response)
        with self.lock:
            body = list(self.app(environ, start_response))  # werkzeug sends the status with the body
            save(self.path)
        return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True, help="the pickle file the buckets live in")
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    load(args.state)
    app = Durable(DomainDispatcherApplication(create_backend_app), args.state)
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


@dataclass(frozen=True)
class DurableS3(S3Server):
    """A ``tests.durable_s3`` server in a subprocess: ``start()``, ``kill()``, and ``S3Server``'s helpers."""

    folder: Path = Path(".")  # its state file and log
    procs: list = field(default_factory=list)  # the server processes started, the last one current

    def start(self, timeout_s: float = 60) -> None:
        """Start the server (again) on the same port and state file; return once it answers."""
        cmd = [sys.executable, "-m", "tests.durable_s3", "--port", str(self.port), "--state", str(self.state)]
        with open(self.folder / "s3.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2).close()
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not start; see {self.folder / 's3.log'}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server: no chance to save anything, as when a machine dies."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)

    @property
    def state(self) -> Path:
        return self.folder / "s3.pickle"


@pytest.fixture(name="durable_s3")
def durable_s3_fixture(monkeypatch, tmp_path) -> DurableS3:
    """A durable S3 server, started, with the AWS environment pointing at it; killed at the end."""
    server = DurableS3(host="127.0.0.1", port=_free_port(), folder=tmp_path)
    point_aws_at(server, monkeypatch, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


if __name__ == "__main__":
    main()
