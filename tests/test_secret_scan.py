"""Everything a run leaves behind, scanned for the secrets planted around it: the console of every
command, the Ray session's files (logs, uploaded packages), the Jobs API's view of the job, the MLflow
server's store and artifacts (params, tags, metrics, job.yaml, the registry), the stack's own logs and
the job's storage. ``addctl stack up`` on loopback, ``addctl submit``, a tiny job to the end.

Planted: a secret the job refers to as ``${env:NAME}`` (passed to the Ray head with ``--pass-env``, so the
workers resolve it and hold its value), and credentials in the submitting shell that no part of the
stack or the job may receive.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import stack
from orchestrator.cli import main
from orchestrator.jobs import JobsClient

pytestmark = pytest.mark.slow

REFERENCED = f"scan-referenced-{secrets.token_hex(8)}"
AMBIENT = {
    "AWS_SECRET_ACCESS_KEY": f"scan-ambient-aws-{secrets.token_hex(8)}",
    "HF_TOKEN": f"hf_{secrets.token_hex(16)}",
    "ADD_SCAN_DB_PASSWORD": f"scan-ambient-db-{secrets.token_hex(8)}",
}
PLANTED = [REFERENCED, *AMBIENT.values()]


def test_no_planted_secret_is_left_anywhere(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.mlflow_server import tiny_job

    folder = Path(tempfile.mkdtemp(prefix="addscan-", dir="/tmp"))  # short: Ray's socket paths
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(folder / "auth_token"))
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ADD_SCAN_SECRET", REFERENCED)
    for name, value in AMBIENT.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    console: list[str] = []
    state = None

    def addctl(*args: str, code: int | None = 0):
        result = runner.invoke(main, list(args))
        console.append(result.output)
        assert code is None or result.exit_code == code, result.output[-3000:]
        return result

    try:
        addctl("stack", "up", "--dir", str(folder), "--num-cpus", "6", "--object-store-mb", "200",
               "--pass-env", "ADD_SCAN_SECRET")  # fmt: skip
        state = stack.load_state(folder)
        exports = stack.env_exports(state)
        for name, value in exports.items():
            monkeypatch.setenv(name, value)
        job = tiny_job(
            tmp_path,
            exports["MLFLOW_TRACKING_URI"],
            "tiny-scanned",
            env={"API_TOKEN": "${env:ADD_SCAN_SECRET}", "HF_HUB_OFFLINE": "1"},
            eval={"features": "none", "scorer": "none"},
        )
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        submitted = addctl("submit", str(path))
        job_id = submitted.stdout.strip().splitlines()[-1]
        info = JobsClient().wait(job_id, timeout_s=600, poll_s=3)
        logs = addctl("logs", job_id).output
        assert info.status == "SUCCEEDED", f"{info.status}: {info.message}\n{logs[-4000:]}"
        addctl("status", job_id)
        addctl("list")
        addctl("models", "show", "tiny-scanned", "--tracking-uri", exports["MLFLOW_TRACKING_URI"])

        # the Jobs API's record of the job
        from ray.job_submission import JobSubmissionClient

        token = (folder / "auth_token").read_text().strip()
        record = JobSubmissionClient(exports["RAY_API_SERVER_ADDRESS"], headers={"Authorization": f"Bearer {token}"})
        views = [json.dumps(record.get_job_info(job_id).model_dump(), default=str)]
        # MLflow through its API: every run's params, tags and metrics, the registry's versions
        client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("tiny-scanned").experiment_id])
        assert runs
        for run in runs:
            views.append(json.dumps([run.data.params, run.data.tags, run.data.metrics]))
        views += [json.dumps(dict(v.tags)) + str(v.source) for v in client.search_model_versions("name='tiny-scanned'")]
    finally:
        if stack.load_state(folder):
            stack.down(folder)

    # every file: the stack's logs, MLflow's store and artifacts, Ray's session, the job's storage
    state_ray = next(s for s in (state or {}).get("services", []) if s["name"] == "ray")
    roots = {folder, Path(state_ray["extra"]["temp_dir"]), tmp_path}
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"ray.log", "mlflow.log", "s3.log", "mlflow.db"} <= names  # the scan sees the stack's stores and logs
    logged = [p for p in files if folder in p.parents and b"${env:ADD_SCAN_SECRET}" in p.read_bytes()]
    assert logged  # and what the runs logged to MLflow (the reference, as params and in job.yaml)
    for secret in PLANTED:
        needle = secret.encode()
        leaked = [str(p) for p in files if needle in p.read_bytes()]
        assert leaked == [], f"{secret[:12]}... found in {leaked}"
        assert not any(secret in text for text in console + views)
    shutil.rmtree(folder, ignore_errors=True)
    if Path(state_ray["extra"]["temp_dir"]).exists():
        shutil.rmtree(state_ray["extra"]["temp_dir"], ignore_errors=True)
