"""Secrets in text: recognise them, mask them, and read the environment without racing other threads.

One redactor for every message and every logged string (``redact``): it masks the values of
credential-like variables of this process's environment, values registered with ``remember``
(credentials resolved from ``${env:NAME}`` references, the S3 keys a filesystem was built with),
and whatever has the shape of a credential whatever its context (``CLEAR_SECRETS``): URL
user-info, credential parameters of a query string, connection-string keys, AWS key ids, private
keys, well-known token formats. ``find_clear_secret`` is the same shapes as a check: the job spec
refuses a value that matches one.

``environ()`` is a copy of ``os.environ`` taken in one step: iterating ``os.environ`` while
another thread (MLflow's telemetry) sets or deletes a variable raises ``KeyError`` or
``RuntimeError`` (it killed sweep trials at start).

Secrets in a job file appear only as references ``${env:NAME}`` (``SECRET_REF``); ``check_secrets``
refuses a clear value under a secret-looking key (``SECRET_NAME``), and ``resolve_secrets`` replaces
references with their values where the job runs (the driver and each worker), never on the client.

Imports nothing heavy: the job spec's validation uses it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

# Names of variables holding credentials: a whole word of the name (TOKENIZERS_PARALLELISM is none).
CREDENTIAL_ENV = re.compile(
    r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|PRIVATE|ACCESS_KEY|API_KEY|AUTH|ACCOUNT_KEY|"
    r"CONNECTION_STRING|SAS)(_|$)",
    re.IGNORECASE,
)
# Values under such names that are settings, not secrets (AUTH=token, *_TOKEN_PATH=..., numbers).
NOT_SECRET = re.compile(r"^(true|false|yes|no|on|off|none|null|disabled|enabled|token|[0-9.]+)$", re.IGNORECASE)
_PATH_LIKE_NAME = re.compile(r"(_PATH|_FILE|_DIR|_MODE)$", re.IGNORECASE)

# Credential parameters of a URL's query string (SAS signatures, presigned S3 URLs, API keys).
_QUERY_KEYS = (
    r"token|access_token|id_token|refresh_token|api[_-]?key|apikey|key|sig|signature|password|passwd|pwd|"
    r"secret|client_secret|auth|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential"
)
_TOKEN_FORMATS = (
    r"hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,}"
)
# (pattern, what it is, group to mask: 0 the whole match). A URL user-info counts as a secret
# when it has a password or its user part is a token (long, or of a known token format).
CLEAR_SECRETS: tuple[tuple[re.Pattern, str, int], ...] = (
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id", 0),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*(?:-----END [A-Z ]*PRIVATE KEY-----)?"), "a private key", 0),
    (
        re.compile(r"(?i)\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|AccessKey)=([^;\s\"']+)"),
        "a connection-string key",
        1,
    ),
    (re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@\s:?#]*:[^/@\s?#]+)@"), "a password in a URL", 1),
    (
        re.compile(rf"[A-Za-z][A-Za-z0-9+.-]*://((?:{_TOKEN_FORMATS}|[A-Za-z0-9_.~-]{{20,}}))@"),
        "a token in a URL's user part",
        1,
    ),
    (re.compile(rf"(?i)[?&;](?:{_QUERY_KEYS})=([^&#\s\"']+)"), "a credential in a URL's query string", 1),
    (re.compile(rf"\b(?:{_TOKEN_FORMATS})\b"), "an API token", 0),
)
MASK = "***"
# A reference to a variable of the environment where the job runs: the whole value, ``${env:NAME}``.
SECRET_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
# Keys of a job file whose value must be such a reference, never clear text.
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY)", re.IGNORECASE)
_remembered: set[str] = set()


def environ() -> dict[str, str]:
    """A copy of ``os.environ`` taken in one step, safe while other threads change the environment."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        # dict.copy() is one C call under the GIL: no other thread's putenv/unsetenv can interleave.
        snapshot = data.copy()
        decode_key = getattr(os.environ, "decodekey", _decode)
        decode_value = getattr(os.environ, "decodevalue", _decode)
        return {decode_key(k): decode_value(v) for k, v in snapshot.items()}
    for _ in range(1000):  # another os.environ implementation: retry the Python-level iteration
        try:
            return dict(os.environ.copy())
        except (KeyError, RuntimeError):
            continue
    raise RuntimeError("the environment kept changing while it was read")


_environ = environ  # for the functions below whose ``environ`` argument is a mapping


def _decode(value):
    return os.fsdecode(value) if isinstance(value, bytes) else value


def is_credential_name(name: str) -> bool:
    """Whether a variable's name says it holds a credential (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``)."""
    return bool(CREDENTIAL_ENV.search(name)) and not _PATH_LIKE_NAME.search(name)


def ambient_secrets(env: dict[str, str] | None = None) -> set[str]:
    """Values of the credential-like variables of the environment (long enough to be secrets)."""
    env = environ() if env is None else env
    return {v for k, v in env.items() if is_credential_name(k) and len(v) >= 8 and not NOT_SECRET.match(v)}


def remember(values: Iterable[str | None]) -> None:
    """Mask these values from now on in this process (resolved references, a filesystem's keys)."""
    _remembered.update(v for v in values if v and len(v) >= 4 and not NOT_SECRET.match(v))


def find_clear_secret(text: str) -> str | None:
    """What kind of credential ``text`` holds in clear (``"a password in a URL"``), or None."""
    for pattern, what, _ in CLEAR_SECRETS:
        if pattern.search(text):
            return what
    return None


def mask_patterns(text: str) -> str:
    """``text`` with every credential-shaped part masked (no knowledge of actual values needed)."""
    for pattern, _, group in CLEAR_SECRETS:
        if group:
            text = pattern.sub(lambda m, g=group: m.group(0).replace(m.group(g), MASK), text)
        else:
            text = pattern.sub(MASK, text)
    return text


def redact(text: str, values: Iterable[str] = ()) -> str:
    """``text`` with every secret this process knows of, and every credential-shaped part, masked."""
    text = str(text)
    secrets = ambient_secrets() | _remembered | {v for v in values if v and len(v) >= 4 and not NOT_SECRET.match(v)}
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return mask_patterns(text)


_factory_installed = False


def redact_log_records() -> None:
    """From now on, every log record this process creates has its message redacted (idempotent).

    A record factory, not a handler filter: it covers every logger and handler, Ray's and MLflow's too.
    """
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a bad format string: leave it to the handler to report)
            return record
        record.msg, record.args = redact(message), ()
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


# ---- references ``${env:NAME}``: checked in the job file, resolved where the job runs ----------------


class SecretError(RuntimeError):
    """A ``${env:NAME}`` reference whose variable is not set where it is resolved (names, never values)."""


def check_secrets(values: dict[str, str], where: str) -> dict[str, str]:
    """Values under secret-looking names must be ``${env:NAME}`` references, never clear text."""
    for key, value in values.items():
        if SECRET_NAME.search(key) and not SECRET_REF.match(str(value)):
            raise ValueError(
                f"{where}.{key}: looks like a secret given in clear; give a reference to a variable set "
                f"on the workers instead, e.g. ${{env:{key.upper()}}}"
            )
    return values


def references(values: Mapping[str, str]) -> dict[str, str]:
    """``{key: NAME}`` for each value of ``values`` that is a ``${env:NAME}`` reference."""
    return {k: m[1] for k, v in values.items() if (m := SECRET_REF.match(str(v)))}


def resolve_secrets(
    values: Mapping[str, str], where: str = "env", environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """On a worker: ``values`` with each ``${env:NAME}`` replaced by that variable's value.

    Raises ``SecretError`` naming the keys and variables (never a value) when one is not set.
    Call it where the job runs, never on the client; do not log what it returns.
    """
    env = _environ() if environ is None else environ
    resolved, missing = {}, []
    for key, value in values.items():
        ref = SECRET_REF.match(str(value))
        if ref is None:
            resolved[key] = str(value)
        elif ref[1] in env:
            resolved[key] = env[ref[1]]
        else:
            missing.append(f"{where}.{key} -> ${{env:{ref[1]}}}")
    if missing:
        raise SecretError(
            f"not set on this machine: {', '.join(missing)}; set the variable in the workers' environment "
            "(a Kubernetes Secret, the environment of `ray start`, or your shell for `addctl run`)"
        )
    # From here this process holds the values: mask them in every message and log record.
    remember(resolved[k] for k in references(values))
    redact_log_records()
    return resolved


def apply_env(values: Mapping[str, str], environ: Mapping[str, str] | None = None) -> list[str]:
    """On a worker: set a job's ``env`` (references resolved) in this process; returns the names set."""
    resolved = resolve_secrets(values, "env", environ)
    os.environ.update(resolved)
    return sorted(resolved)
