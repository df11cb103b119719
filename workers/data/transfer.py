"""Copies between a local folder and storage that ride out a restarting server: the one place where
storage operations are retried.

pyarrow's S3 client retries each request a few times within a fraction of a second (``max_attempts``),
which a server being restarted outlasts. ``retrying`` keeps calling on a connection-type error with
exponential backoff (0.5 s doubling, at most 8 s apart) for up to ``StorageOptions.retry_s`` seconds,
then raises a ``StorageError`` naming the URI; any other error (access denied, no such bucket, a full
local disk) is raised at once. Each file is its own retried copy, so one lost request costs that
file only.

Atomicity: an object appears in S3 whole or not at all (pyarrow completes a multipart upload on
close). A folder is complete once ``upload_folder`` returns; a folder left partial by a failed copy
is never read, because readers go by a commit point written after it: Ray Train registers a
checkpoint only when every rank's upload returned, and an export's marker file is uploaded last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from .storage import StorageError, StorageOptions, display_uri, redact

__all__ = ["download_folder", "is_transient", "retrying", "upload_folder"]

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
            reason = redact(str(err))
            if not is_transient(err):
                raise StorageError(f"{display_uri(uri)}: could not {what}: {reason}") from None
            if time.monotonic() + delay > deadline:
                raise StorageError(
                    f"{display_uri(uri)}: storage unreachable: could not {what} in {attempt} attempts over "
                    f"{retry_s:g} s (storage option retry_s): {reason}"
                ) from None
            log.warning("%s: could not %s (attempt %d), retrying in %.1f s: %s", display_uri(uri), what, attempt,
                        delay, reason)  # fmt: skip
        time.sleep(delay)
        delay, attempt = min(2 * delay, _MAX_DELAY_S), attempt + 1


def upload_folder(
    local: str | os.PathLike,
    fs: pafs.FileSystem,
    path: str,
    uri: str,
    options: StorageOptions | None = None,
    last: str | None = None,
) -> None:
    """Copy the folder ``local`` to ``path`` on ``fs`` (``uri`` is how messages name it), file by file,
    each retried; ``last``: a relative file name uploaded after all the others (a commit marker)."""
    local = Path(local)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if last is not None:
        files = [f for f in files if f != last] + [last]
    retrying(lambda: fs.create_dir(path), uri, "create the folder", options)
    for name in files:
        retrying(lambda name=name: _copy(str(local / name), pafs.LocalFileSystem(), f"{path}/{name}", fs),
                 f"{uri.rstrip('/')}/{name}", "write it", options)  # fmt: skip


def download_folder(
    fs: pafs.FileSystem, path: str, local: str | os.PathLike, uri: str, options: StorageOptions | None = None
) -> None:
    """Copy the folder ``path`` on ``fs`` into ``local`` (retried as a whole: reads are idempotent)."""
    retrying(lambda: _copy(path, fs, str(local), pafs.LocalFileSystem()), uri, "read it", options)


def _copy(source: str, source_fs: pafs.FileSystem, destination: str, destination_fs: pafs.FileSystem) -> None:
    # one thread: pyarrow's threaded uploads to S3 are unsafe (apache/arrow#32372), as Ray Train notes
    pafs.copy_files(source, destination, source_filesystem=source_fs, destination_filesystem=destination_fs,
                    use_threads=False, chunk_size=64 * 1024 * 1024)  # fmt: skip
