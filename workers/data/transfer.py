"""Storage that rides out a restarting server: the one place where storage operations are retried.

pyarrow's S3 client retries each request a few times within a fraction of a second (``max_attempts``),
which a server being restarted outlasts. ``retrying`` calls again after a connection-type error with
exponential backoff (0.5 s doubling, at most 8 s apart) for up to ``StorageOptions.retry_s`` seconds,
then raises a ``StorageError`` naming the URI; any other error (access denied, no such bucket) is
raised at once.

``retrying_filesystem(fs, uri, options)`` wraps a pyarrow filesystem so that every operation goes
through ``retrying``. A file written to it is buffered (in memory, spilling to a local temporary file)
and uploaded whole when closed, so its upload can be repeated; an object appears in S3 whole or not
at all. The runs' storage of a Ray Train run is wrapped this way: the controller's checkpoint registry
(``checkpoint_manager_snapshot.json``), the workers' checkpoint copies and the export all retry.

Atomicity of a folder: ``upload_folder`` writes file by file; a folder left partial by a failed upload
is never read, because readers go by a commit point written after it: Ray Train registers a checkpoint
only when every rank's upload returned, and an export's marker file is uploaded last.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from .storage import StorageError, StorageOptions, display_uri, redact

__all__ = ["download_folder", "is_transient", "retrying", "retrying_filesystem", "upload_folder"]

log = logging.getLogger(__name__)
T = TypeVar("T")
# what a server that is down, restarting or overloaded answers (pyarrow's AWS error names, curl's words)
_TRANSIENT = (
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "REQUEST_TIMEOUT",
    "curlCode",
    "Could not connect",
    "Connection reset",
    "Connection refused",
    "Broken pipe",
    "timed out",
)
_FIRST_DELAY_S, _MAX_DELAY_S = 0.5, 8.0
_CHUNK = 8 * 1024 * 1024
_SPOOL = 64 * 1024 * 1024  # a buffered upload larger than this goes to a local temporary file


def is_transient(err: BaseException) -> bool:
    """A connection-type storage error, worth trying again."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return isinstance(err, OSError) and any(token in str(err) for token in _TRANSIENT)


def retrying(call: Callable[[], T], uri: str, what: str, options: StorageOptions | None = None) -> T:
    """``call()``, again after each connection-type error, for up to ``options.retry_s`` seconds."""
    retry_s = (options or StorageOptions()).retry_s
    deadline, delay, attempt = time.monotonic() + retry_s, _FIRST_DELAY_S, 1
    while True:
        try:
            return call()
        except StorageError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise
            reason = redact(str(err))
            if time.monotonic() + delay > deadline:
                raise StorageError(
                    f"{display_uri(uri)}: storage unreachable: could not {what} in {attempt} attempts over "
                    f"{retry_s:g} s (storage option retry_s): {reason}"
                ) from None
            log.warning("%s: could not %s (attempt %d), retrying in %.1f s: %s", display_uri(uri), what, attempt,
                        delay, reason)  # fmt: skip
        time.sleep(delay)
        delay, attempt = min(2 * delay, _MAX_DELAY_S), attempt + 1


def retrying_filesystem(fs: pafs.FileSystem, uri: str, options: StorageOptions | None = None) -> pafs.FileSystem:
    """``fs`` with every operation retried through connection errors; ``uri``: its root, for messages."""
    return pafs.PyFileSystem(_RetryingHandler(fs, uri, options or StorageOptions()))


class _RetryingHandler(pafs.FileSystemHandler):
    """Delegates to ``fs``, each call through ``retrying``; output streams upload whole on close."""

    def __init__(self, fs: pafs.FileSystem, uri: str, options: StorageOptions):
        self.fs, self.uri, self.options = fs, uri, options

    def _retry(self, call: Callable[[], T], what: str, path: str = "") -> T:
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else ""
        return retrying(call, f"{scheme}://{path}" if scheme and path else self.uri, what, self.options)

    def __eq__(self, other) -> bool:
        return isinstance(other, _RetryingHandler) and self.fs.equals(other.fs) and self.uri == other.uri

    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry(lambda: self.fs.get_file_info(paths), "look up files", paths[0] if paths else "")

    def get_file_info_selector(self, selector):
        return self._retry(lambda: self.fs.get_file_info(selector), "list a folder", selector.base_dir)

    def create_dir(self, path, recursive):
        self._retry(lambda: self.fs.create_dir(path, recursive=recursive), "create a folder", path)

    def delete_dir(self, path):
        self._retry(lambda: self.fs.delete_dir(path), "delete a folder", path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), "empty a folder", path)

    def delete_root_dir_contents(self):
        self._retry(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "empty the root")

    def delete_file(self, path):
        self._retry(lambda: self.fs.delete_file(path), "delete a file", path)

    def move(self, src, dest):
        self._retry(lambda: self.fs.move(src, dest), "move a file", src)

    def copy_file(self, src, dest):
        self._retry(lambda: self.fs.copy_file(src, dest), "copy a file", src)

    def open_input_stream(self, path):
        return self._retry(lambda: self.fs.open_input_stream(path), "open a file", path)

    def open_input_file(self, path):
        return self._retry(lambda: self.fs.open_input_file(path), "open a file", path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("appending is not supported on object storage")


class _UploadOnClose(io.RawIOBase):
    """A file being written: buffered, then uploaded whole (and again after a connection error) on close."""

    def __init__(self, handler: _RetryingHandler, path: str, metadata):
        super().__init__()
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = tempfile.SpooledTemporaryFile(max_size=_SPOOL)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def __del__(self) -> None:  # dropped without close(): nothing is uploaded
        self.buffer.close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.handler._retry(self._upload, "write a file", self.path)
        finally:
            self.buffer.close()
            super().close()

    def _upload(self) -> None:
        self.buffer.seek(0)
        with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.buffer.read(_CHUNK):
                out.write(chunk)


def upload_folder(local: str | os.PathLike, fs: pafs.FileSystem, path: str, last: str | None = None) -> None:
    """Copy the folder ``local`` to ``path`` on ``fs`` file by file; ``last``: a relative file name
    uploaded after all the others (a commit marker)."""
    local = Path(local)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if last is not None:
        files = [f for f in files if f != last] + [last]
    fs.create_dir(path)
    for folder in sorted({Path(name).parent.as_posix() for name in files} - {"."}):
        fs.create_dir(f"{path}/{folder}")
    for name in files:
        _copy(str(local / name), pafs.LocalFileSystem(), f"{path}/{name}", fs)


def download_folder(fs: pafs.FileSystem, path: str, local: str | os.PathLike) -> None:
    """Copy the folder ``path`` on ``fs`` into ``local``."""
    _copy(path, fs, str(local), pafs.LocalFileSystem())


def _copy(source: str, source_fs: pafs.FileSystem, destination: str, destination_fs: pafs.FileSystem) -> None:
    # one thread: pyarrow's threaded uploads to S3 are unsafe (apache/arrow#32372), as Ray Train notes
    pafs.copy_files(source, destination, source_filesystem=source_fs, destination_filesystem=destination_fs,
                    use_threads=False, chunk_size=_CHUNK)  # fmt: skip
