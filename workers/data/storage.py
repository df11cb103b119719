"""URI -> filesystem: one place that knows how to reach s3://, gs://, file:// and local paths.

Every other data module asks ``resolve(uri)`` for a ``pyarrow.fs.FileSystem`` and a scheme-less
path, so Ray Data readers (``filesystem=``), the shard writer and the reachability check all talk
to storage the same way.

Credentials never come from a job file. For S3 they come, in botocore's order, from the
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), a named
profile (``StorageOptions.profile`` or ``AWS_PROFILE``), the shared credentials/config files, or
the instance/container role. The endpoint comes from ``StorageOptions.endpoint_url``, else
``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else the profile's ``endpoint_url``; the
region likewise from the options, ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile.
pyarrow is given the endpoint explicitly because some pyarrow versions ignore the environment.

Errors raised here are ``StorageError``: they name the URI (with any ``user:password@`` part
removed), pass through ``redact`` so that no credential value can appear, and are raised
``from None`` so that an unredacted chained message is never logged either.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import AfterValidator, BeforeValidator

from workers import secrets as _secrets
from workers.config import known_scheme

__all__ = [
    "SCHEMES",
    "STORAGE_OPTIONS",
    "StorageError",
    "StorageOptions",
    "StorageOptionsMap",
    "StorageUri",
    "StringMap",
    "atomic_write",
    "check_storage_options",
    "commit_bytes",
    "check_reachable",
    "display_uri",
    "join_uri",
    "redact",
    "resolve",
    "split_uri",
    "storage_options",
]

SCHEMES = ("file", "s3", "s3a", "gs", "gcs")  # what ``resolve`` reaches (a bare path is file://)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_OAUTH_ACCESS_TOKEN")
_known_secrets: set[str] = set()


class StorageError(RuntimeError):
    """Storage is unreachable, misconfigured or missing; the message names the URI, never a secret."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Holds no credentials by design: those come from env or profile."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 (MinIO, moto); overrides the env vars
    region: str | None = None  # S3 region; default from env/profile, else us-east-1
    profile: str | None = None  # named AWS profile for credentials/region/endpoint
    anonymous: bool = False  # unsigned requests (public buckets)
    connect_timeout: float = 5.0  # seconds; small so an unreachable endpoint fails fast
    request_timeout: float = 60.0  # seconds per request
    max_attempts: int = 3  # S3 retry attempts per request
    retry_s: float = 60.0  # seconds a copy keeps retrying through connection errors (``transfer.retrying``)


# Keys of ``storage.options`` / ``data.storage_options`` in a job file, each with its parser.
STORAGE_OPTIONS = {
    "endpoint_url": str,
    "region": str,
    "profile": str,
    "anonymous": lambda v: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[v.lower()],
    "connect_timeout": float,
    "request_timeout": float,
    "max_attempts": int,
    "retry_s": float,
}


def _storage_uri(v: str) -> str:
    return known_scheme(v, SCHEMES, "storage scheme", "a local path")


StorageUri = Annotated[str, AfterValidator(_storage_uri)]  # s3://, gs://, file:// or a local path


def scalars_as_strings(values):
    """``{"max_attempts": 5, "anonymous": true}`` -> ``{"max_attempts": "5", "anonymous": "true"}``
    (mappings of strings, written in YAML without quotes); anything else is left to validation."""
    if not isinstance(values, Mapping):
        return values
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, int | float):
            value = str(value)
        out[key] = value
    return out


def check_storage_options(values: dict[str, str], where: str) -> dict[str, str]:
    """Only ``StorageOptions`` keys, with values of their type (or references); credentials go in ``env``."""
    _secrets.check_secrets(values, where)
    for key, value in values.items():
        if key not in STORAGE_OPTIONS:
            raise ValueError(
                f"{where}.{key}: unknown storage option; allowed: {', '.join(STORAGE_OPTIONS)} "
                "(credentials go in `env:` as ${env:NAME} references, e.g. AWS_SECRET_ACCESS_KEY)"
            )
        if not _secrets.SECRET_REF.match(value):
            try:
                STORAGE_OPTIONS[key](value)
            except (KeyError, ValueError):
                kind = "true or false" if key == "anonymous" else STORAGE_OPTIONS[key].__name__
                raise ValueError(f"{where}.{key}: must be {kind}, got {value!r}") from None
    return values


def StringMap(check: Callable[[dict[str, str]], dict[str, str]]):  # noqa: N802  (a type, named as one)
    """``dict[str, str]`` of a job file whose scalars may be written unquoted (``max_attempts: 5``),
    then checked by ``check``."""
    return Annotated[dict[str, str], BeforeValidator(scalars_as_strings), AfterValidator(check)]


def StorageOptionsMap(where: str):  # noqa: N802  (a type, named as one)
    """The options of a storage in a job file at ``where`` (``storage.options``, ``data.storage_options``)."""
    return StringMap(lambda values: check_storage_options(values, where))


def storage_options(options: Mapping[str, str], where: str) -> StorageOptions:
    """A job's ``storage.options`` / ``data.storage_options`` as ``StorageOptions``, references resolved
    (call it where the job runs)."""
    unknown = sorted(set(options) - set(STORAGE_OPTIONS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown storage option; allowed are {', '.join(STORAGE_OPTIONS)}")
    values = _secrets.resolve_secrets({k: str(v) for k, v in options.items()}, where)
    return StorageOptions(**{k: STORAGE_OPTIONS[k](v) for k, v in values.items()})


def split_uri(uri: str) -> tuple[str, str]:
    """``("s3", "bucket/key")``, ``("file", "/abs/path")``; a bare path is ``("file", abspath)``."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme == "file":
            return "file", os.path.abspath(parts.netloc + parts.path if parts.netloc else parts.path)
        # hostname drops any user:password@ and lower-cases; keep the bucket as written.
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return scheme, (netloc + parts.path).rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(uri))


def display_uri(uri: str) -> str:
    """The URI as it may appear in messages: without any ``user:password@`` part."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", uri)


def join_uri(uri: str, *parts: str) -> str:
    """Join path components onto a URI or local path with ``/``."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def redact(text: str) -> str:
    """Replace every credential value this process knows of with ``***`` (``workers.secrets.redact``,
    plus the credentials a filesystem was built with), and drop URL user-info."""
    text = _secrets.redact(text, {*_known_secrets, *(v for k in _SECRET_ENV if (v := os.environ.get(k)))})
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\1", text)


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to pass to it (no scheme)."""
    options = options or StorageOptions()
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    if scheme in ("s3", "s3a"):
        return _s3_filesystem(uri, options), path
    if scheme not in SCHEMES:
        raise StorageError(
            f"{display_uri(uri)}: unsupported storage scheme {scheme}://; supported: "
            f"{', '.join(s + '://' for s in SCHEMES)} or a local path"
        )
    try:
        import gcsfs  # noqa: F401  (optional dependency)
    except ImportError:
        raise StorageError(f"{display_uri(uri)}: gs:// needs the gcsfs package (pip install gcsfs)") from None
    return _fsspec_filesystem(uri, scheme), path


def _s3_session(uri: str, options: StorageOptions):
    """The boto3 session (credentials, region) and the endpoint URL for S3, or None for AWS itself."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.Session(profile_name=options.profile) if options.profile else boto3.Session()
        scoped = session._session.get_scoped_config()  # the active profile's section of ~/.aws/config
    except botocore.exceptions.ProfileNotFound:
        raise StorageError(f"{display_uri(uri)}: AWS profile {options.profile!r} not found") from None
    endpoint = (
        options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or scoped.get("endpoint_url")
    )
    return session, endpoint


def _s3_filesystem(uri: str, options: StorageOptions) -> pafs.S3FileSystem:
    session, endpoint = _s3_session(uri, options)
    region = options.region or session.region_name or "us-east-1"
    kwargs: dict = dict(
        region=region,
        connect_timeout=options.connect_timeout,
        request_timeout=options.request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
    )
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme or "https")
    if options.anonymous:
        kwargs["anonymous"] = True
    else:
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            _known_secrets.update(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)
            _secrets.remember(_known_secrets)
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
    try:
        return pafs.S3FileSystem(**kwargs)
    except Exception as e:  # bad endpoint syntax and the like
        raise StorageError(f"{display_uri(uri)}: cannot configure S3: {redact(str(e))}") from None


def _fsspec_filesystem(uri: str, scheme: str) -> pafs.FileSystem:
    import fsspec

    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"{display_uri(uri)}: unsupported storage scheme {scheme!r}: {redact(str(e))}"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_reachable(uri: str, options: StorageOptions | None = None, *, must_exist: bool = True) -> None:
    """Fail with a ``StorageError`` naming ``uri`` unless its bucket (and, if asked, the path) exists."""
    options = options or StorageOptions()
    fs, path = resolve(uri, options)
    scheme, _ = split_uri(uri)
    shown = display_uri(uri)
    if scheme in ("s3", "s3a"):
        endpoint = _s3_session(uri, options)[1]
        shown += f" (endpoint {display_uri(endpoint)})" if endpoint else " (AWS S3)"
    try:
        if scheme != "file":
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{shown}: bucket {bucket!r} does not exist or is not accessible")
        if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageError(f"{shown}: nothing found at this location")
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"{shown}: storage unreachable: {_hint(e)}") from None


def _hint(e: Exception) -> str:
    msg = redact(str(e))
    if "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "curlCode" in msg:
        return f"{msg} (check the endpoint: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network)"
    if "NO_SUCH_BUCKET" in msg:
        return f"{msg} (wrong bucket name?)"
    if "ACCESS_DENIED" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg:
        return f"{msg} (check the credentials in the environment or profile)"
    return msg


# ---- atomic writes: a reader sees the old file or the new one, never half of one -----------------


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a local file or folder through ``write(tmp)`` to a hidden temporary sibling, then move it
    into place (a folder replaces the folder there). A failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def commit_bytes(fs: pafs.FileSystem, path: str, write: Callable[[object], object]) -> None:
    """``atomic_write`` on any pyarrow filesystem (object storage included): ``write(stream)`` to a
    temporary sibling named ``_<name>.<random>.tmp`` (readers skip ``_`` names), then move it to ``path``."""
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f"_{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001  (the temporary file may not exist)
            pass
        raise
