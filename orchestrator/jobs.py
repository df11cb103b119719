"""The Ray Jobs API client of ``addctl submit/status/logs/stop/list``: token discovery, packaging, calls.

Token authentication (on by default for ``ray start`` since Ray 2.5x): the token is looked for, in
order, in ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``
(where ``ray start`` writes it), and sent as ``Authorization: Bearer ...``. A missing or rejected
token is a ``RayAuthError`` that says where the token was looked for; no message ever holds it.

What a submission ships (``runtime_env``):

- ``working_dir``: a staging folder holding only ``job.yaml``, the validated job with every
  default and ``--set`` override applied and every secret still a ``${env:NAME}`` reference;
- ``py_modules``: the ``orchestrator`` and ``workers`` packages of this checkout (the code);
- ``env_vars``: ``ADD_SUBMISSION_ID``, ``ADD_CODE_VERSION``, ``PYTHONUNBUFFERED`` and the job's plain
  ``env`` values (``HF_HOME: /cache``: every process of the job, Ray Data's included, gets them),
  never a ``${env:NAME}`` reference nor a value holding ``$``: Ray shows ``env_vars`` on its
  dashboard and runs ``expandvars`` on them (a ``${AWS_SECRET_ACCESS_KEY}`` there would receive
  the real secret, an unset one would become an empty string). The whole ``env`` travels in
  ``job.yaml``, references unresolved; the driver (``addctl run``) and each training worker
  resolve them from their own machine's environment, and a missing one fails there, naming it.

The entrypoint is the CLI itself, ``python -m orchestrator.cli run job.yaml``, which on the
cluster joins the cluster's Ray (``RAY_ADDRESS`` is set for a job's driver). A tracking URI holding
credentials is refused (``check_tracking_uri``): the entrypoint is shown by ``status`` and ``list``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.spec import JobSpec, dump_job
from workers.secrets import environ, find_clear_secret, mask_patterns

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("orchestrator", "workers")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_LOCATIONS = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token"
SUBMISSION_ENV = "ADD_SUBMISSION_ID"  # the controller tags its parent run with it
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayJobsError(RuntimeError):
    """The Ray cluster could not be reached or refused a request (never holds a token)."""


class RayAuthError(RayJobsError):
    """The cluster wants a token that was not found, or rejected the one sent."""


@dataclass(frozen=True)
class Token:
    """An auth token and where it came from; ``repr`` and ``str`` never show the value."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<token from {self.source}>"


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The Ray auth token, found the way Ray finds it; None when there is none."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(environ["RAY_AUTH_TOKEN"].strip(), "the environment variable RAY_AUTH_TOKEN")
    candidates = []
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append((Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH"))
    candidates.append(((home or Path.home()) / ".ray" / "auth_token", "the default file"))
    for path, how in candidates:
        try:
            value = path.read_text().strip()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        if value:
            return Token(value, f"{path} ({how})")
    return None


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The dashboard URL: ``--address``, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else the local one."""
    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_API_SERVER_ADDRESS")
    if not address and environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = environ["RAY_ADDRESS"]
    address = (address or DEFAULT_ADDRESS).rstrip("/")
    return address if "://" in address else f"http://{address}"


def is_loopback(address: str) -> bool:
    """Whether the cluster runs on this machine (then local paths in the job are shared with it)."""
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_env(env: dict[str, str]) -> dict[str, str]:
    """The job's ``env`` values Ray may carry in ``runtime_env``: neither references (resolved on the
    cluster, from job.yaml) nor anything with a ``$`` that Ray's ``expandvars`` would expand."""
    return {k: v for k, v in env.items() if "$" not in v}


def check_tracking_uri(uri: str) -> str:
    """``uri`` if it holds no credential; else a ``ValueError`` (the URI shown masked): a submitted job's
    tracking URI is in its entrypoint, which ``status`` and ``list`` show to anyone who can see the job."""
    if what := find_clear_secret(uri):
        raise ValueError(
            f"the tracking URI {mask_patterns(uri)} holds {what}: a submitted job shows its tracking URI; give the "
            "URI without credentials and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) in the cluster's environment"
        )
    return uri


def code_version() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes), read-only; None outside git."""
    env = {**environ(), "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, env=env
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def submission_id(spec: JobSpec) -> str:
    """A readable, unique submission id: ``add-<job name>-<8 hex>``."""
    return f"add-{spec.name}-{uuid.uuid4().hex[:8]}"


@dataclass
class JobInfo:
    """What ``status`` and ``list`` show of a Ray job."""

    submission_id: str
    status: str
    message: str = ""
    entrypoint: str = ""
    job_name: str = ""
    start_time: float | None = None  # seconds since the epoch
    end_time: float | None = None
    driver_exit_code: int | None = None

    @classmethod
    def from_details(cls, d) -> JobInfo:
        meta = d.metadata or {}
        return cls(
            submission_id=d.submission_id or d.job_id or "",
            status=str(getattr(d.status, "value", d.status)),
            message=d.message or "",
            entrypoint=d.entrypoint or "",
            job_name=meta.get("add.job", ""),
            start_time=d.start_time / 1000 if d.start_time else None,
            end_time=d.end_time / 1000 if d.end_time else None,
            driver_exit_code=getattr(d, "driver_exit_code", None),
        )


class JobsClient:
    """Ray Jobs API calls with the token found by ``find_token`` and errors that say what to do."""

    def __init__(self, address: str | None = None, token: Token | None = None, *, find: bool = True):
        self.address = resolve_address(address)
        self.token = token if token is not None else (find_token() if find else None)
        self._client = None

    def _headers(self) -> dict[str, str]:
        # Always an Authorization header: without one, Ray's client would look for a token itself
        # (and abort the process when RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH names no file).
        return {"Authorization": f"Bearer {self.token.value}" if self.token else ""}

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = self._call(lambda: JobSubmissionClient(self.address, headers=self._headers()))
        return self._client

    def _call(self, fn):
        """Run one API call, turning Ray's errors into ``RayAuthError``/``RayJobsError`` without the token."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as err:
            raise self._auth_error(str(err)) from None
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise RayJobsError(
                f"cannot reach the Ray dashboard at {self.address}: is the cluster up, and is this its "
                "dashboard address (ray start --head --dashboard-host=...; --address or RAY_API_SERVER_ADDRESS)?"
            ) from None
        except RuntimeError as err:
            text = self._scrub(str(err))
            if "status code 404" in text and "does not exist" not in text:
                raise RayJobsError(f"{self.address}: {text}") from None
            raise RayJobsError(text) from None

    def _auth_error(self, text: str) -> RayAuthError:
        if self.token is None:
            return RayAuthError(
                f"the Ray cluster at {self.address} requires an auth token and none was found; looked in "
                f"{TOKEN_LOCATIONS}. Copy the cluster's token into one of them (e.g. from the head node's "
                "~/.ray/auth_token, or `ray get-auth-token` there)."
            )
        return RayAuthError(
            f"the Ray cluster at {self.address} rejected the auth token taken from {self.token.source}; "
            f"the token is looked for in {TOKEN_LOCATIONS} (first found wins): put the cluster's token there."
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self.token.value, "***") if self.token else text

    # ---- the API -----------------------------------------------------------------------------------

    def check(self) -> str:
        """Connect and authenticate (``/api/version`` needs the token); returns the cluster's Ray version."""
        client = self.client
        self._call(lambda: client._check_connection_and_version())
        return client._server_ray_version or "?"

    def submit(
        self,
        spec: JobSpec,
        *,
        run_args: list[str] = (),
        submission: str | None = None,
        extra_env: dict[str, str] | None = None,
        entrypoint_resources: dict[str, float] | None = None,
    ) -> str:
        """Ship the job and the code, start ``addctl run job.yaml`` on the cluster; returns the submission id."""
        submission = submission or submission_id(spec)
        env = plain_env(spec.env) | {SUBMISSION_ENV: submission, "PYTHONUNBUFFERED": "1"} | (extra_env or {})
        if version := code_version():
            env.setdefault("ADD_CODE_VERSION", version)
        staging = Path(tempfile.mkdtemp(prefix="addctl-submit-"))
        try:
            (staging / "job.yaml").write_text(dump_job(spec))
            runtime_env = {
                "working_dir": str(staging),
                "py_modules": [str(REPO_ROOT / p) for p in CODE_PACKAGES],
                "env_vars": env,
                "excludes": ["__pycache__", "*.pyc"],
            }
            # --verbose: the job's log (``addctl logs``) is where a submitted job's Ray and worker output belongs
            entrypoint = shlex.join(["python", "-m", "orchestrator.cli", "run", "job.yaml", "--verbose", *run_args])
            client = self.client
            return self._call(
                lambda: client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission,
                    runtime_env=runtime_env,
                    metadata={"add.job": spec.name},
                    entrypoint_num_cpus=(entrypoint_resources or {}).get("CPU"),
                )
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def info(self, job_id: str) -> JobInfo:
        client = self.client
        return JobInfo.from_details(self._call(lambda: client.get_job_info(job_id)))

    def list(self) -> list[JobInfo]:
        client = self.client
        jobs = [JobInfo.from_details(d) for d in self._call(client.list_jobs)]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        client = self.client
        return self._call(lambda: client.get_job_logs(job_id))

    def follow(self, job_id: str) -> Iterator[str]:
        """The job's log as it is written, until the job ends."""
        client = self.client
        self.info(job_id)  # a clear error for an unknown job before the websocket opens
        agen = client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield self._call(lambda: loop.run_until_complete(agen.__anext__()))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM to its driver, SIGKILL a few seconds later)."""
        client = self.client
        return bool(self._call(lambda: client.stop_job(job_id)))

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0, on_status=None) -> JobInfo:
        """Poll until the job ends (or ``timeout_s`` passes); ``on_status(info)`` sees each poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info(job_id)
            if on_status:
                on_status(info)
            if info.status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(poll_s)
