"""Pytest fixtures: a real ``mlflow server`` on loopback, runs in SQLite, artifacts on a moto S3 server.

Import them from ``tests/conftest.py`` (next to the S3 fixtures)::

    from tests.mlflow_server import mlflow_server, mlflow_tracking  # noqa: F401

``mlflow_server`` (session scope) starts a moto S3 server in its own process, creates a bucket
there and starts ``mlflow server --backend-store-uri sqlite:///... --artifacts-destination
s3://<bucket>/mlartifacts`` at a free port on 127.0.0.1 (proxied artifacts: clients never talk to
S3 themselves); both are stopped at the end of the session. Its own moto process, not the
session's in-process one: every test taking ``s3_server`` resets that one (moto's state is global
to a process), which would delete the artifact bucket under the live tracking server; and one
server for the session saves its ~20 s start per module. ``mlflow_tracking`` (function scope)
also points ``MLFLOW_TRACKING_URI`` at it for the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3_server import S3Server, _free_port

START_TIMEOUT_S = 120


@dataclass
class MlflowServer:
    """A running tracking server and where its runs and artifacts live."""

    url: str
    bucket: str
    s3: S3Server
    db: Path
    log: Path

    @property
    def artifact_root(self) -> str:
        return f"s3://{self.bucket}/mlartifacts"

    def client(self):
        """An ``MlflowClient`` talking to this server."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def artifact_keys(self, prefix: str = "") -> list[str]:
        """Every object the server stored in its bucket (what ``log_artifact`` really wrote)."""
        return self.s3.keys(self.bucket, prefix)

    def read_artifact_object(self, key: str) -> bytes:
        return self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def find_value(self, value: str) -> list[str]:
        """Where ``value`` occurs in the server's runs (params, tags, metric keys), registry (model and
        version tags, descriptions) and artifacts (every object in the bucket, byte for byte)."""
        client, hits = self.client(), []
        needle = value.encode()
        for exp in client.search_experiments(view_type=3):
            hits += [f"experiment {exp.name} tag {k}" for k, v in exp.tags.items() if value in f"{k}{v}"]
            for run in client.search_runs([exp.experiment_id], run_view_type=3, max_results=1000):
                data, rid = run.data, run.info.run_id
                hits += [f"run {rid} param {k}" for k, v in data.params.items() if value in f"{k}{v}"]
                hits += [f"run {rid} tag {k}" for k, v in data.tags.items() if value in f"{k}{v}"]
                hits += [f"run {rid} metric {k}" for k in data.metrics if value in k]
                hits += [f"run {rid} name" for _ in [0] if value in (run.info.run_name or "")]
        for model in client.search_registered_models(max_results=1000):
            hits += [f"model {model.name} tag {k}" for k, v in model.tags.items() if value in f"{k}{v}"]
            hits += [f"model {model.name} description" for _ in [0] if value in (model.description or "")]
            for mv in client.search_model_versions(f"name='{model.name}'"):
                hits += [f"version {mv.version} tag {k}" for k, v in mv.tags.items() if value in f"{k}{v}"]
        for key in self.artifact_keys():
            if needle in self.read_artifact_object(key) or value in key:
                hits.append(f"artifact s3://{self.bucket}/{key}")
        return hits


def server_env(s3: S3Server) -> dict[str, str]:
    """The tracking server's environment: S3 endpoint and credentials for its artifact proxy only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url,
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        AWS_DEFAULT_REGION=s3.region,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def start_mlflow_server(s3: S3Server, folder: Path, bucket: str | None = None) -> tuple[subprocess.Popen, MlflowServer]:
    """Start ``mlflow server`` on a free loopback port; returns once it answers ``/health``."""
    bucket = bucket or f"mlflow-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    folder.mkdir(parents=True, exist_ok=True)
    port, db, log = _free_port(), folder / "mlflow.db", folder / "mlflow-server.log"
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", f"s3://{bucket}/mlartifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=server_env(s3), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_http(f"{url}/health", proc, log)
    return proc, MlflowServer(url=url, bucket=bucket, s3=s3, db=db, log=log)


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server and the workers it forked (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def start_moto_process(folder: Path) -> tuple[subprocess.Popen, S3Server]:
    """A moto S3 server in its own process on a free loopback port (state separate from the tests')."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with open(folder / "moto.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    s3 = S3Server(host="127.0.0.1", port=port)
    _wait_http(f"{s3.endpoint_url}/moto-api/", proc, folder / "moto.log")
    return proc, s3


def _wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{url} did not come up; the server's log:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One tracking server (and its S3 server) for the session."""
    folder = tmp_path_factory.mktemp("mlflow")
    moto_proc, s3 = start_moto_process(folder)
    try:
        proc, server = start_mlflow_server(s3, folder)
        try:
            yield server
        finally:
            stop_process(proc)
    finally:
        stop_process(moto_proc)


@pytest.fixture
def mlflow_tracking(mlflow_server: MlflowServer, monkeypatch) -> MlflowServer:
    """The session's tracking server, with ``MLFLOW_TRACKING_URI`` pointing at it for this test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return mlflow_server


# ---- a tiny job for the controller and sweep tests -----------------------------------------------------

TINY_CAPTIONS = ["a photo of a sneaker", "a black dress", "a white shirt", "a picture of a boot"]


def tiny_job_files(folder: Path, records: int = 32) -> tuple[Path, Path]:
    """A tiny SD teacher and a Parquet image-caption set of 16×16 images, written under ``folder``."""
    import numpy as np

    from tests.tiny_models import save_tiny_sd
    from workers.data.shards import write_shards
    from workers.eval.images import png_bytes

    teacher, data = folder / "teacher", folder / "data"
    if not teacher.exists():
        save_tiny_sd(teacher)
    if not data.exists():
        rng = np.random.default_rng(0)
        rows = [
            (png_bytes((rng.random((16, 16, 3)) * 255).astype(np.uint8)), TINY_CAPTIONS[i % 4], i % 4)
            for i in range(records)
        ]
        write_shards(rows, str(data), rows_per_shard=16)
    return teacher, data


def tiny_job(folder: Path, tracking_uri: str, name: str, **sections) -> dict:
    """The job YAML (as a dict) of a 4-step ADD run on the tiny teacher: LADD discriminator (no download),
    one worker, no FSDP, a report and a sample grid every step or two, evaluated with tiny stand-ins for
    Inception and CLIP (``eval.features``/``eval.scorer`` factories). ``sections`` update it."""
    teacher, data = tiny_job_files(folder)
    job = {
        "name": name,
        "teacher": {"source": str(teacher)},
        "data": {"uri": str(data), "resolution": 16, "channels": 3, "local_shuffle_buffer": 0},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "log_every": 1,
            "checkpoint_every": 4,
            "sample_every": 2,
            "sample_prompts": TINY_CAPTIONS[:2],
            "keep_checkpoints": 1,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 1, "fsdp": False, "max_failures": 0},
        "storage": {"uri": str(folder / "runs")},
        "tracking": {"uri": tracking_uri, "experiment": name, "model_name": name},
        "eval": {
            "prompts": TINY_CAPTIONS[:2],
            "images_per_prompt": 4,
            "teacher_steps": 4,
            "guidance_scale": 3.0,
            "speed_batch_size": 4,
            "features": "tests.mlflow_server:TinyFeatures",
            "scorer": "tests.mlflow_server:brightness",
        },
        "promotion": {"max_fid_ratio": 1.5, "alignment_margin": 0.1, "min_speedup": 1.0},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


class TinyFeatures:
    """A fixed random conv net as the Fréchet feature space (Inception cannot be downloaded in tests)."""

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
        ).eval()

    def __call__(self, images):
        import torch

        with torch.no_grad():
            return self.net(images.expand(-1, 3, -1, -1))


def brightness_scorer(images, prompts):
    """A stand-in prompt scorer: mean brightness (any per-image score exercises the plumbing)."""
    return images.mean(dim=(1, 2, 3))


def brightness():
    """The factory the job's ``eval.scorer`` names."""
    return brightness_scorer
