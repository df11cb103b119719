"""The model registry: students registered as versions of the job's model, aliases, and a registry lock.

Aliases (MLflow 3 has no stages): ``candidate`` is the newest registered student of the job,
``champion`` the promoted one (moved only by ``orchestrator.promotion.promote``), and
``previous-champion`` the champion it replaced (a rollback target).

``RegistryLock`` serialises read-modify-write sequences on one registered model across
processes and machines. MLflow has no compare-and-set, but creating a registered model is
atomic (the name is a unique key in the store): the lock is a registered model named
``<name>.promotion-lock``, created to acquire and deleted to release, tagged with its owner's
token and a lease expiry so a crashed holder's lock can be broken after ``ttl_s``.
"""

from __future__ import annotations

import getpass
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CANDIDATE, CHAMPION, PREVIOUS_CHAMPION = "candidate", "champion", "previous-champion"
LOCK_SUFFIX = ".promotion-lock"
_EXISTS = {"RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"}
_MISSING = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def is_missing(err: MlflowException) -> bool:
    return err.error_code in _MISSING


def ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    """Create the registered model unless it exists."""
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code not in _EXISTS:
            raise


def register_candidate(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str | None,
    model_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> ModelVersion:
    """A new version of ``name`` from a logged model, tagged, with the alias ``candidate`` moved to it."""
    ensure_registered_model(client, name, description="ADD students distilled by the job of this name")
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}, model_id=model_id
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or ``None`` when it is not set."""
    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException as err:
        if is_missing(err) or err.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Every alias of ``name`` and its version."""
    return dict(client.get_registered_model(name).aliases)


def set_version_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, object]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def whoami() -> str:
    """``user@host`` of this process, for audit tags."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class LockTimeout(TimeoutError):
    """Another process held the registry lock for longer than we were willing to wait."""


class LockLost(RuntimeError):
    """Our lease expired and another process took the lock while we held it."""


class RegistryLock:
    """A cross-process mutex on one registered model (see the module docstring).

    Usage: ``with RegistryLock(client, name): ...``. Acquiring is idempotent under client retries
    (a create that succeeded but whose reply was lost shows our own token). ``check()`` raises
    ``LockLost`` when the lease was broken by another process, so a holder can verify before
    declaring success. Breaking a stale lock assumes ``ttl_s`` far exceeds any critical section.
    """

    def __init__(
        self, client: MlflowClient, name: str, ttl_s: float = 120.0, timeout_s: float = 60.0, poll_s: float = 0.1
    ):
        self.client, self.name, self.lock_name = client, name, name + LOCK_SUFFIX
        self.ttl_s, self.timeout_s, self.poll_s = ttl_s, timeout_s, poll_s
        self.token = uuid.uuid4().hex

    def _holder(self) -> dict[str, str] | None:
        try:
            return dict(self.client.get_registered_model(self.lock_name).tags)
        except MlflowException as err:
            if is_missing(err):
                return None
            raise

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            tags = {"lock.owner": self.token, "lock.by": whoami(), "lock.expires": f"{time.time() + self.ttl_s:.3f}"}
            try:
                self.client.create_registered_model(
                    self.lock_name, tags=tags, description=f"lock held while promoting {self.name}; not a model"
                )
                return
            except MlflowException as err:
                if err.error_code not in _EXISTS:
                    raise
            holder = self._holder()
            if holder is not None and holder.get("lock.owner") == self.token:
                return  # our create went through; its reply was lost and retried
            if holder is not None and float(holder.get("lock.expires", "inf")) < time.time():
                self._break(holder)
                continue
            if time.monotonic() > deadline:
                by = holder.get("lock.by", "?") if holder else "?"
                raise LockTimeout(
                    f"registered model {self.name!r} is locked by {by} (a promotion); waited {self.timeout_s:.0f} s"
                )
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _break(self, stale: dict[str, str]) -> None:
        """Delete an expired lock, if it is still the one we saw expire."""
        holder = self._holder()
        if holder is not None and holder.get("lock.owner") == stale.get("lock.owner"):
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as err:
                if not is_missing(err):
                    raise

    def check(self) -> None:
        """Raise ``LockLost`` unless we still hold the lock."""
        holder = self._holder()
        if holder is None or holder.get("lock.owner") != self.token:
            raise LockLost(f"the promotion lock of {self.name!r} expired and was taken over; check its aliases")

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("lock.owner") == self.token:
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as err:
                if not is_missing(err):
                    raise

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
