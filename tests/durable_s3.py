"""moto's S3 server with its buckets on disk: killed (SIGKILL) and started again, it still has every
object it acknowledged, as a real object store would.

    python -m tests.durable_s3 --port 9000 --state /tmp/s3.pickle

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
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import run_simple

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


if __name__ == "__main__":
    main()
