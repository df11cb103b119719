"""``addctl submit/status/logs/list/stop`` against a real Ray head started here (``ray start --head`` on
127.0.0.1 at free ports, token authentication on), with a tiny ADD job from submission to the end.

The head's environment holds a secret; the job names it only as a reference. It must appear nowhere:
not in the job's log, not in any file of the Ray session (logs, uploaded packages), not in the job's
record. (Part B's tests scan MLflow for it.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import stack
from orchestrator.cli import main
from orchestrator.jobs import TERMINAL, JobsClient, find_token

pytestmark = pytest.mark.slow

SECRET_ENV = "ADD_TEST_JOB_SECRET"
SECRET = "jobsecret-4d9e2b7a-never-in-logs"
JOB_TIMEOUT_S = 420


@dataclass
class Head:
    url: str
    token_path: Path
    folder: Path  # the session's files: logs, uploaded packages
    service: stack.Service


@pytest.fixture(scope="module")
def head():
    """A Ray head of our own: short temp path (Ray's sockets), a token file of its own, the secret in its env."""
    folder = Path(tempfile.mkdtemp(prefix="addhead-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_AUTH"))}
    env |= {SECRET_ENV: SECRET, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    service = stack.start_ray_head(folder, num_cpus=8, token_path=folder / "auth_token", object_store_mb=300, env=env)
    try:
        stack.wait_healthy([service], timeout_s=180)
        yield Head(service.url, folder / "auth_token", folder, service)
    finally:
        stack.stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def cli(head, monkeypatch, tmp_path):
    """Run addctl in-process against the head, finding its token through RAY_AUTH_TOKEN_PATH."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", head.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's user is used
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def write_job(folder: Path, name: str, **sections) -> Path:
    """A tiny ADD job (part B's tiny teacher and data), tracked in a SQLite store beside it."""
    from tests.mlflow_server import tiny_job

    env = {"API_TOKEN": f"${{env:{SECRET_ENV}}}", "HF_HUB_OFFLINE": "1"} | sections.pop("env", {})
    job = tiny_job(
        folder,
        f"sqlite:///{folder / 'mlflow.db'}",
        name,
        env=env,
        eval={"features": "none", "scorer": "none"},
        **sections,
    )
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="module")
def finished_job(head, tmp_path_factory):
    """One tiny job submitted with ``addctl submit`` and run to its end."""
    folder = tmp_path_factory.mktemp("submitted")
    path = write_job(folder, "tiny-submitted")
    env = {"RAY_AUTH_TOKEN_PATH": str(head.token_path), "RAY_API_SERVER_ADDRESS": head.url}
    saved = {k: os.environ.get(k) for k in (*env, "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    os.environ.update(env)
    for k in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        os.environ.pop(k, None)
    try:
        started = time.monotonic()
        result = CliRunner().invoke(main, ["submit", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        job_id = result.stdout.strip().splitlines()[-1]
        info = JobsClient(head.url).wait(job_id, timeout_s=JOB_TIMEOUT_S, poll_s=2)
        return {"id": job_id, "info": info, "folder": folder, "seconds": time.monotonic() - started}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_submitted_job_runs_to_completion(finished_job, cli):
    info = finished_job["info"]
    logs = cli("logs", finished_job["id"]).output
    assert info.status == "SUCCEEDED", f"{info.status}: {info.message}\n{logs[-4000:]}"
    assert info.job_name == "tiny-submitted" and info.entrypoint.startswith("python -m orchestrator.cli run job.yaml")
    start = [m.start() for m in re.finditer(r"^\{$", logs, re.M)][-1]
    result = json.loads(logs[start : logs.index("\n}", start) + 2])  # what `addctl run` printed on the cluster
    assert result["model_name"] == "tiny-submitted" and str(result["model_version"]) == "1"


def test_status_list_and_logs(finished_job, cli):
    job_id = finished_job["id"]
    status = cli("status", job_id)
    assert status.exit_code == 0 and f"{job_id}: SUCCEEDED" in status.output
    assert json.loads(cli("status", job_id, "--json").output)["status"] == "SUCCEEDED"
    listed = cli("list")
    assert listed.exit_code == 0 and job_id in listed.output and "tiny-submitted" in listed.output
    logs = cli("logs", job_id)
    assert logs.exit_code == 0 and "Running entrypoint" in logs.output
    followed = cli("logs", job_id, "--follow")  # a finished job: the whole log, then the stream ends
    assert followed.exit_code == 0 and "Running entrypoint" in followed.output


def test_the_job_tracked_its_runs_where_it_was_told(finished_job):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{finished_job['folder'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-submitted").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["job.submission_id"] == finished_job["id"]
    assert str(client.get_model_version_by_alias("tiny-submitted", "candidate").version) == "1"


def _bytes_still_there(path):
    """A live head replaces some of its files by renaming a temp file over them (Ray's
    tmp_prom_metrics_service_discovery.json): one listed a moment ago may be gone; its successor is read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def test_a_secret_given_by_reference_appears_in_no_ray_log(finished_job, head, cli):
    assert SECRET not in cli("logs", finished_job["id"]).output
    needle = SECRET.encode()
    files = [p for p in head.folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("session_" in str(p) and p.suffix in (".log", ".out", ".err") for p in files)  # the scan sees logs
    leaked = [str(p) for p in files if needle in _bytes_still_there(p)]
    assert leaked == []
    from ray.job_submission import JobSubmissionClient

    record = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token_path.read_text()}"})
    details = record.get_job_info(finished_job["id"])
    assert SECRET not in json.dumps(details.model_dump(), default=str)
    # the job's env is not in runtime_env (shown by the dashboard, expanded by Ray): job.yaml carries the
    # reference, which the driver and the workers resolve from the head's environment (the job succeeded)
    assert "API_TOKEN" not in details.runtime_env["env_vars"]


def test_a_reference_missing_on_the_cluster_fails_the_job_naming_it(head, cli, tmp_path):
    path = write_job(tmp_path, "tiny-missing-secret", env={"API_TOKEN": "${env:ADD_TEST_NOT_ON_THE_CLUSTER}"})
    submitted = cli("submit", str(path))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    info = JobsClient(head.url).wait(job_id, timeout_s=JOB_TIMEOUT_S, poll_s=2)
    logs = cli("logs", job_id).output
    assert info.status == "FAILED", logs[-3000:]
    assert "env.API_TOKEN -> ${env:ADD_TEST_NOT_ON_THE_CLUSTER}" in logs and "Traceback" not in logs


def test_stop_a_running_job(head, cli, tmp_path):
    """``addctl stop``: the job ends STOPPED, and its MLflow runs end KILLED (the controller's signal handler)."""
    from mlflow.tracking import MlflowClient

    path = write_job(tmp_path, "tiny-stopped", train={"steps": 400, "checkpoint_every": 400, "sample_every": 400})
    submitted = cli("submit", str(path))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def training_run():
        """Read with sqlite3, not the MLflow client: a client opening the store while the job is still
        creating it runs the same schema migrations at once and breaks the job's."""
        import sqlite3
        from contextlib import closing

        if JobsClient(head.url).info(job_id).status in TERMINAL:
            raise AssertionError(cli("logs", job_id).output[-3000:])
        if not (tmp_path / "mlflow.db").exists():
            return False
        try:
            with closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True)) as db:
                (runs,) = db.execute(
                    "SELECT COUNT(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = ?",
                    ("tiny-stopped",),
                ).fetchone()
        except sqlite3.OperationalError:  # no tables yet, or locked: the job is setting its store up
            return False
        return runs >= 2  # the parent and its training run: the driver is inside trainer.fit()

    wait_for(training_run, JOB_TIMEOUT_S, "the job's training run")
    stopped = cli("stop", job_id, "--timeout", "60", "--tracking-uri", uri)
    assert stopped.exit_code == 0, stopped.output
    assert "now STOPPED" in stopped.output and cli("status", job_id).output.startswith(f"{job_id}: STOPPED")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # only now: creating it opens (and migrates) the store
    runs = client.search_runs([client.get_experiment_by_name("tiny-stopped").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}


def test_unknown_job_is_bad_input(cli):
    result = cli("status", "add-no-such-job-00000000")
    assert result.exit_code == 2 and "add-no-such-job-00000000" in result.output


def test_missing_token_says_where_it_was_looked_for(head, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-here"))
    assert find_token() is None
    result = cli("list")
    assert result.exit_code == 1
    for place in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", head.url):
        assert place in result.output
    assert head.token_path.read_text().strip() not in result.output


def test_wrong_token_is_refused_without_printing_either_token(head, cli, monkeypatch):
    wrong = "wrong-token-3b1f9c2d5e7a"
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    status = cli("status", "add-anything")
    assert status.exit_code == 1 and "rejected" in status.output and wrong not in status.output
    result = cli("list")
    assert result.exit_code == 1 and "rejected" in result.output and "RAY_AUTH_TOKEN" in result.output
    assert wrong not in result.output and head.token_path.read_text().strip() not in result.output
    token = find_token()
    assert wrong not in repr(token) and wrong not in str(token)
