"""MLflow tracking of a job: one parent run per job, one child run per training run (or sweep trial).

A child run gets the resolved config flattened into params (``train.lr_student``...), the job
YAML as resolved (``job.yaml``), the code version (``mlflow.source.git.commit``), its metrics per
step and sample grids as image series. Everything it logs passes ``Redactor``: secrets are
given in the spec only as ``${env:NAME}`` references (logged as such); their values, and the
credentials of the environment, are replaced by ``***`` wherever text is logged.

``JobStopped`` and ``stop_on_signals`` turn SIGTERM (what ``ray job stop`` sends) and SIGINT into
an exception, so the controller can end its runs as KILLED before Ray's grace period runs out.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from orchestrator.spec import JobSpec, dump_job
from workers.secrets import NOT_SECRET, SECRET_REF, ambient_secrets, environ, redact

log = logging.getLogger(__name__)

PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- secrets --------------------------------------------------------------------------------------


def secret_references(value) -> set[str]:
    """Names of every ``${env:NAME}`` reference anywhere in a (nested) spec dump."""
    if isinstance(value, Mapping):
        return set().union(*(secret_references(v) for v in value.values())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(secret_references(v) for v in value)) if value else set()
    if isinstance(value, str) and (match := SECRET_REF.match(value)):
        return {match.group(1)}
    return set()


class Redactor:
    """Replaces secrets with ``***`` in any text about to be logged (``workers.secrets.redact``): the
    values, in this process's environment, of the spec's ``${env:NAME}`` references, of credential-like
    variables, and anything shaped like a credential (URL user-info, query tokens, keys).

    Holds only the names (it is pickled to the workers, where references resolve to values). Reads
    the environment in one step (``workers.secrets.environ``): MLflow's telemetry thread changes it.
    """

    def __init__(self, names: Iterable[str] = ()):
        self.names = sorted(set(names))

    @classmethod
    def for_spec(cls, spec_dump: Mapping) -> Redactor:
        return cls(secret_references(spec_dump))

    def secrets(self) -> list[str]:
        env = environ()
        referenced = {env[n] for n in self.names if env.get(n)}
        values = {v for v in referenced | ambient_secrets(env) if len(v) >= 4 and not NOT_SECRET.match(v)}
        return sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        return redact(text, self.secrets())


# ---- what a run records ---------------------------------------------------------------------------


def spec_dump(spec: JobSpec) -> dict:
    """The spec with every default filled in, as plain JSON types (references stay references)."""
    return spec.model_dump(mode="json")


def flatten(value, prefix: str = "") -> dict[str, str]:
    """Nested config to ``{"train.lr_student": "1e-05", ...}``; lists as JSON; long values cut to MLflow's limit."""
    if isinstance(value, Mapping) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    text = json.dumps(value) if isinstance(value, list | tuple | Mapping) else str(value)
    return {prefix: text[: PARAM_VALUE_MAX - 3] + "..." if len(text) > PARAM_VALUE_MAX else text}


def code_version() -> dict[str, str]:
    """Tags naming the code: the git commit (and whether the tree had changes) when run from a
    checkout, else ``ADD_CODE_VERSION`` (set at job submission where the code travels without .git)."""
    env = {**environ(), "GIT_OPTIONAL_LOCKS": "0"}  # read-only: git status must not refresh the index

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, env=env
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    tags = {}
    commit = git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        tags["code.git_commit"] = commit
        status = git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["code.git_dirty"] = str(bool(status)).lower()
    if version := os.environ.get("ADD_CODE_VERSION"):
        tags["code.version"] = version
        tags.setdefault(MLFLOW_GIT_COMMIT, version)
    return tags


def numeric_metrics(values: Mapping[str, object]) -> dict[str, float]:
    """The finite numbers among reported values (reports also carry strings, paths, flags)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


# ---- the experiment ------------------------------------------------------------------------------


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of the experiment ``name``: restored if it was deleted, created if missing. In a SQLite
    store without a server its artifacts go to ``mlartifacts/<name>`` beside the database (MLflow would
    put them in ``./mlruns`` of whatever folder the job runs in, for a submitted job a temporary one)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            folder = Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / safe
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001  (created meanwhile by another job)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def ensure_experiment(uri: str, name: str) -> str:
    """``experiment_id`` with a client of its own (a SQLite database's folder made first)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return experiment_id(MlflowClient(tracking_uri=uri, registry_uri=uri), uri, name)


def mark_stopped(
    tracking_uri: str | None, *, submission_id: str | None = None, parent_run_id: str | None = None
) -> list[str]:
    """End as KILLED a job's parent run and its children still RUNNING, found by the parent's id or
    the ``job.submission_id`` tag (for ``addctl stop`` when the driver died before it could); returns their ids."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if parent_run_id is None:
        if submission_id is None:
            raise ValueError("give the parent run id or the submission id")
        found = client.search_runs(experiments, f"tags.`job.submission_id` = '{submission_id}'", max_results=10)
        parents = [r.info.run_id for r in found]
    else:
        parents = [parent_run_id]
    ended = []
    for parent in parents:
        children = client.search_runs(
            experiments, f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'", max_results=1000
        )
        for run_id in [r.info.run_id for r in children] + [parent]:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
                ended.append(run_id)
    return ended


# ---- the runs -------------------------------------------------------------------------------------


class JobTracker:
    """The MLflow side of one job: its experiment, its parent run, its child runs."""

    def __init__(self, spec: JobSpec, tracking_uri: str | None = None, client: MlflowClient | None = None):
        self.spec = spec
        self.tracking_uri = tracking_uri or spec.tracking.uri
        self.client = client or MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.redact = Redactor.for_spec(spec_dump(spec))
        self.experiment_id = experiment_id(self.client, self.tracking_uri, spec.tracking.experiment)
        self.parent_run_id: str | None = None
        self.child_run_ids: list[str] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Pickled into trial processes: everything but the client and the lock, rebuilt there."""
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._lock = threading.Lock()

    def _tags(self, tags: Mapping[str, object]) -> list[RunTag]:
        return [RunTag(k, self.redact(str(v))[:PARAM_VALUE_MAX]) for k, v in tags.items()]

    def start_parent(self, run_name: str | None = None, tags: Mapping[str, object] | None = None) -> str:
        """The job's parent run: job name, data mode (real or synthetic), code version and job YAML."""
        tags = {
            "job.name": self.spec.name,
            "job.kind": "job",
            "data.mode": self.spec.data.mode,
            **code_version(),
            **(tags or {}),
        }
        run = self.client.create_run(self.experiment_id, run_name=run_name or self.spec.name, tags={})
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, tags=self._tags(tags))
        self.log_text(self.parent_run_id, dump_job(self.spec), "job.yaml")
        return self.parent_run_id

    def start_child(
        self, spec: JobSpec, run_name: str, params: Mapping | None = None, tags: Mapping[str, object] | None = None
    ) -> str:
        """A training run under the parent: ``spec`` (the trial's resolved spec) as params and YAML."""
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: run_name,
            "job.name": self.spec.name,
            "data.mode": spec.data.mode,
            **code_version(),
            **(tags or {}),
        }
        # born with its parent's id: a stop that lands before the tags are logged still finds it (mark_stopped)
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id}
        )
        run_id = run.info.run_id
        with self._lock:
            self.child_run_ids.append(run_id)
        flat = flatten(spec_dump(spec)) | {k: str(v) for k, v in (params or {}).items()}
        items = [Param(k, self.redact(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])
        self.client.log_batch(run_id, tags=self._tags(tags))
        self.log_text(run_id, dump_job(spec), "job.yaml")
        return run_id

    def log_metrics(self, run_id: str, values: Mapping[str, object], step: int, timestamp_ms: int | None = None):
        """The numeric entries of one report, at ``step``."""
        ts = timestamp_ms or int(time.time() * 1000)
        metrics = [Metric(k, v, ts, int(step)) for k, v in numeric_metrics(values).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_data_report(self, run_id: str, report: Mapping | None, step: int | None = None) -> dict:
        """A finished run's data report (``workers.data.ingest.RecordLedger.report``) on its run: metrics
        ``data/*`` and the tag ``data.lost`` (rows lost per shard, with the first reason); returns what the
        job's summary shows of it ({} without a report)."""
        if not report:
            return {}
        seen = report["records"] + report["bad_records"]
        metrics = {
            "data/records": report["records"],
            "data/bad_records": report["bad_records"],
            "data/bad_fraction": report["bad_records"] / seen if seen else 0.0,
            "data/lost_rows": report["lost_rows"],
        }
        self.log_metrics(run_id, metrics, step=step or 0)
        lost = {shard: entry["rows"] for shard, entry in report["lost"].items()}
        self.set_tags(run_id, {"data.lost": json.dumps(report["lost"]) if lost else "none"})
        if lost:
            log.warning("data: %d bad rows lost in %d shard(s): %s", sum(lost.values()), len(lost), lost)
        return {"records": report["records"], "bad_records": report["bad_records"], "lost_rows_by_shard": lost}

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, self.redact(text), artifact_file)

    def log_image(self, run_id: str, image, key: str, step: int) -> None:
        """An image series entry (``key`` at ``step``); ``image`` is PIL, an array or PNG bytes."""
        if isinstance(image, bytes | bytearray):
            from PIL import Image

            image = Image.open(io.BytesIO(image))
        self.client.log_image(run_id, image, key=key, step=int(step))

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        self.client.log_batch(run_id, tags=self._tags(tags))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run unless it already ended (a child the trial closed itself)."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status=status)

    def end_all(self, status: str) -> None:
        """End every child still running, then the parent, with ``status`` (FINISHED, FAILED, KILLED)."""
        RunStatus.from_string(status)
        for run_id in [*self.child_run_ids, *self.running_children()]:
            try:
                self.end(run_id, status)
            except Exception:  # keep going: the parent matters most
                continue
        if self.parent_run_id:
            self.end(self.parent_run_id, status)

    def running_children(self) -> list[str]:
        """Child runs of the parent still RUNNING, including ones trial processes created."""
        if not self.parent_run_id:
            return []
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        return [r.info.run_id for r in runs]

    def child_runs(self) -> list:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'"
        )
        return list(runs)


# ---- from the training workers --------------------------------------------------------------------


class TrackingCallback:
    """Rank 0's MLflow logging, a ``workers.train.loop.TrainCallback`` by its methods (not imported
    here: that would pull torch and Ray into every import of tracking): every report's metrics at its
    step, sample grids as the image series ``samples``, and at the end the run's status and export.

    Logging problems are warned about, never raised: losing a metric must not kill a training run.

    After a resume (an attempt restored from a checkpoint older than the steps already logged), the
    replayed steps are not logged again: each metric's last logged step is read from the run once,
    and points at or before it are skipped, so every step appears once per metric.
    """

    def __init__(self, tracking_uri: str, run_id: str, secret_names: Iterable[str] = ()):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.redact = Redactor(secret_names)
        self._client = None
        self._logged: dict[str, int] = {}  # metric -> last step already in the run (after a resume)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _safely(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow: could not log %s to run %s: %s", what, self.run_id, self.redact(str(err)))

    def _tags(self, tags: Mapping[str, object]) -> None:
        items = [RunTag(k, self.redact(str(v))[:PARAM_VALUE_MAX]) for k, v in tags.items() if v is not None]
        self.client.log_batch(self.run_id, tags=items)

    def on_start(self, info: dict) -> None:
        self._safely("start info", self._tags, {f"train.{k}": v for k, v in info.items()})
        if (info.get("restored_from_step") or -1) >= 0:
            self._safely("the steps already logged", self._read_logged)

    def _read_logged(self) -> None:
        """Each metric's last step in the run (what an earlier attempt logged past the checkpoint)."""
        for key in self.client.get_run(self.run_id).data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                self._logged[key] = max(m.step for m in history)

    def on_log(self, step: int, metrics: dict) -> None:
        ts = int(time.time() * 1000)
        values = numeric_metrics(metrics)
        items = [Metric(k, v, ts, int(step)) for k, v in values.items() if int(step) > self._logged.get(k, -1)]
        if items:
            self._safely("metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def on_samples(self, step: int, images) -> None:
        """``images``: (N, C, H, W) in [0, 1] (a grid is made) or a PIL image."""
        from PIL import Image

        from workers.eval.images import image_grid

        grid = images if isinstance(images, Image.Image) else image_grid(images)
        self._safely("samples", lambda: self.client.log_image(self.run_id, grid, key="samples", step=int(step)))

    def on_end(self, summary: dict) -> None:
        tags = {
            "train.status": summary.get("status"),
            "train.final_step": summary.get("step"),
            "train.message": summary.get("message") or None,
            "export.uri": summary.get("export_uri"),
            "train.warning": " | ".join(summary.get("warnings") or []) or None,
            "train.balance": summary.get("balance"),
        }
        self._safely("the end of training", self._tags, tags)


# ---- stopping -------------------------------------------------------------------------------------


class JobStopped(BaseException):
    """The job was asked to stop (SIGTERM from ``ray job stop``, SIGINT); a BaseException so that
    ``except Exception`` in library code does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stop_on_signals(
    on_stop: Callable[[int], None] | None = None,
    grace_s: float = 1.5,
    signums: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT stop the job: ``on_stop(signum)`` runs at once, and the block
    ends with ``JobStopped`` (or, when the main thread stays blocked, the process exits 128 + signum
    after ``grace_s``).

    Why a watcher thread: Python runs signal handlers only when the main thread executes bytecode,
    and a driver blocked in ``ray.get`` (``trainer.fit()``, ``tuner.fit()``) does not for minutes,
    while ``ray job stop`` SIGKILLs 3 s after its SIGTERM. The C-level handler writes the signal
    number to ``set_wakeup_fd`` at once; the watcher reads it and runs ``on_stop`` (ending the
    MLflow runs as KILLED) within that grace. Only in the main thread; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = tuple(signums)
    raised, done = threading.Event(), threading.Event()
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    def handler(signum, frame):
        if not raised.is_set():  # later signals: the stop is already under way
            raised.set()
            raise JobStopped(signum)

    def watch():
        try:
            data = reader.recv(1)
        except OSError:
            return
        if not data or done.is_set() or data[0] not in signums:
            return
        if on_stop is not None:
            try:
                on_stop(data[0])
            except Exception as err:  # noqa: BLE001
                log.warning("while stopping: %s", err)
        if not done.wait(grace_s):  # the main thread is stuck in C (ray.get): leave now
            logging.shutdown()
            os._exit(128 + data[0])

    previous = {s: signal.signal(s, handler) for s in signums}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="stop-on-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        reader.shutdown(socket.SHUT_RDWR)
        watcher.join(timeout=grace_s + 1)
        reader.close()
        writer.close()
