"""Secrets never in the clear and never echoed: the one redactor, race-free reads of the environment,
what a submission carries, the tracking URI, the stack's services' environments, log records."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import stack
from orchestrator.cli import main
from orchestrator.jobs import JobsClient, Token, check_tracking_uri
from orchestrator.spec import validate_job
from orchestrator.tracking import Redactor, code_version
from workers import secrets
from workers.secrets import resolve_secrets

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "ok", "teacher": {"source": "runs/teacher"}, "data": {"uri": "runs/data"}}

CREDENTIALS = [
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==;", "Zm9vYmFyYmF6"),
    ("https://hf_QwErTyUiOpAsDfGhJkLzXcVbNm1234567890@huggingface.co/x", "hf_QwErTy"),
    ("http://admin:hunter2hunter2@mlflow:5000", "hunter2"),
    ("https://store.example.com/f?sv=2020&sig=AbCdEf0123456789%3D&se=2030", "AbCdEf0123"),
    ("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=deadbeefcafe0123&X-Amz-Date=1", "deadbeefcafe"),
    ("https://api.example.com/v1?api_key=k-1234567890abcdef", "k-1234567890"),
    ("key id AKIAQWERTYUIOPASDFGH in text", "AKIAQWERTYUIOPASDFGH"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA"),
    ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 here", "ghp_aBcDeF"),
]
HARMLESS = [
    "runs/data/fashion-mnist",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "s3://add-runs/sd15",
    "http://mlflow.mlflow.svc.cluster.local:5000",
    "ssh://git@github.com/org/repo",
    "a photo of a cat, 4k, key light",
    "https://example.com/search?q=cats&page=2",
]


@pytest.mark.parametrize("text, secret", CREDENTIALS, ids=[c[1][:10] for c in CREDENTIALS])
def test_credential_shapes_are_found_and_masked(text, secret):
    assert secrets.find_clear_secret(text) is not None
    masked = secrets.redact(text)
    assert secret not in masked and secrets.MASK in masked


@pytest.mark.parametrize("text", HARMLESS)
def test_ordinary_values_are_neither_refused_nor_changed(text):
    assert secrets.find_clear_secret(text) is None
    assert secrets.redact(text) == text


@pytest.mark.parametrize("text, secret", CREDENTIALS[:6], ids=[c[1][:10] for c in CREDENTIALS[:6]])
def test_the_spec_refuses_them_anywhere_the_sweep_included(text, secret):
    from orchestrator.errors import JobSpecError

    for job in (
        {**MINIMAL, "env": {"HARMLESS_NAME": text}},
        {**MINIMAL, "train": {"sample_prompts": [text]}},
        {**MINIMAL, "sweep": {"search_space": {"train.sample_prompts": {"choice": [["a"], [text]]}}}},
    ):
        with pytest.raises(JobSpecError) as err:
            validate_job(job)
        assert secret not in str(err.value)


def test_ambient_and_referenced_secrets_are_masked(monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "conn-string-value-123456")
    monkeypatch.setenv("SOMETHING_PLAIN", "referenced-value-98765")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    redact = Redactor(["SOMETHING_PLAIN"])
    text = "conn-string-value-123456 / referenced-value-98765 / parallel false / http://u:pw-77x@h/"
    assert redact(text) == "*** / *** / parallel false / http://***@h/"


def test_reads_of_the_environment_survive_another_thread_changing_it():
    """MLflow's telemetry thread sets and deletes a variable while trials start: iterating ``os.environ``
    then raises. The same churn here; the naive read must fail (the race is real), ours never."""
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            os.environ[f"_ADD_TEST_CHURN_{i % 7}"] = "x" * (i % 50)
            os.environ.pop(f"_ADD_TEST_CHURN_{(i + 3) % 7}", None)
            i += 1

    def naive():
        return {k: v for k, v in os.environ.items()}

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    naive_failures = 0
    try:
        redact = Redactor(["HOME"])
        for _ in range(3000):
            try:
                naive()
            except (KeyError, RuntimeError):
                naive_failures += 1
            redact("text with nothing secret")
            secrets.environ()
            secrets.redact("more text")
        code_version()
    finally:
        stop.set()
        thread.join()
        for i in range(7):
            os.environ.pop(f"_ADD_TEST_CHURN_{i}", None)
    assert naive_failures > 0, "the churn never raced the naive read: the test proves nothing"


def test_resolved_references_are_masked_in_every_log_record(monkeypatch, caplog):
    monkeypatch.setenv("ADD_TEST_PLAIN_NAME", "resolved-value-4c5d6e")
    resolve_secrets({"X": "${env:ADD_TEST_PLAIN_NAME}"})
    with caplog.at_level(logging.WARNING):
        logging.getLogger("some.library").warning("connecting with %s", "resolved-value-4c5d6e")
        logging.getLogger("other").error("to http://user:pw-in-log-3@host/")
    assert "resolved-value-4c5d6e" not in caplog.text and "pw-in-log-3" not in caplog.text
    assert "connecting with ***" in caplog.text


class FakeJobs:
    """Stands in for Ray's JobSubmissionClient: keeps what a submission would send."""

    def __init__(self):
        self.sent = {}

    def submit_job(self, **kwargs):
        self.sent = dict(kwargs)
        self.sent["job.yaml"] = (Path(kwargs["runtime_env"]["working_dir"]) / "job.yaml").read_text()
        return kwargs["submission_id"]


def test_a_submission_carries_references_only_never_values(monkeypatch):
    monkeypatch.setenv("ADD_TEST_SUBMIT_SECRET", "submit-secret-value-8a7b")
    monkeypatch.setenv("HOME_LIKE", "/home/someone")
    spec = validate_job(
        {**MINIMAL, "env": {"API_TOKEN": "${env:ADD_TEST_SUBMIT_SECRET}", "HF_HOME": "/cache", "LIT": "$HOME_LIKE"}}
    )
    client = JobsClient("http://127.0.0.1:9", token=Token("t", "test"))
    fake = FakeJobs()
    client._client = fake
    client.submit(spec, run_args=["--tracking-uri", "http://mlflow:5000"])
    env_vars = fake.sent["runtime_env"]["env_vars"]
    assert set(env_vars) <= {"ADD_SUBMISSION_ID", "PYTHONUNBUFFERED", "ADD_CODE_VERSION", "HF_HOME"}
    assert env_vars["HF_HOME"] == "/cache"  # plain values reach every process of the job
    assert "API_TOKEN" not in env_vars and "LIT" not in env_vars  # nothing Ray would expand
    shipped = yaml.safe_load(fake.sent["job.yaml"])
    assert shipped["env"] == {"API_TOKEN": "${env:ADD_TEST_SUBMIT_SECRET}", "HF_HOME": "/cache", "LIT": "$HOME_LIKE"}
    assert "submit-secret-value-8a7b" not in repr(fake.sent)


def test_a_tracking_uri_with_credentials_is_not_submitted(monkeypatch, tmp_path):
    assert check_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    with pytest.raises(ValueError) as err:
        check_tracking_uri("http://admin:pw-uri-5f6@mlflow:5000")
    assert "pw-uri-5f6" not in str(err.value) and "MLFLOW_TRACKING_PASSWORD" in str(err.value)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(MINIMAL))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://hf_QwErTyUiOpAsDfGhJkLzXcVbNm1234567890@mlflow.example.com")
    # a cluster nobody listens at: had the check let it through, this would be exit 1 (unreachable)
    result = CliRunner().invoke(main, ["submit", str(job), "--address", "http://10.255.255.1:9"])
    assert result.exit_code == 2, result.output
    assert "hf_QwErTy" not in result.output and "tracking URI" in result.output


def test_each_stack_service_gets_only_what_it_needs():
    shell = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "LC_ALL": "C.UTF-8",
        "AWS_SECRET_ACCESS_KEY": "real-cloud-secret",
        "AWS_ACCESS_KEY_ID": "AKIAREALREALREALREAL",
        "HF_TOKEN": "hf_real",
        "HF_HOME": "/cache/hf",
        "GITHUB_TOKEN": "ghp_x",
        "DATABASE_URL": "postgresql://app:dbpass@db/app",
        "MLFLOW_TRACKING_PASSWORD": "mlpw",
        "MLFLOW_TRACKING_URI": "http://elsewhere",
        "MOTO_PORT": "1",
        "RAY_AUTH_TOKEN": "raytoken",
        "RANDOM_TOOL_SETTING": "x",
    }
    s3 = stack.service_env("s3", shell)
    mlflow = stack.service_env("mlflow", shell)
    ray = stack.service_env("ray", shell, ("HF_TOKEN",))
    assert s3 == {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C.UTF-8", "MOTO_PORT": "1"}
    assert mlflow == {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C.UTF-8"}
    basics = {"PATH": "/usr/bin", "HOME": "/home/u", "LC_ALL": "C.UTF-8"}
    assert ray == basics | {"HF_HOME": "/cache/hf", "HF_TOKEN": "hf_real"}  # HF_TOKEN only because it was named


def test_status_and_list_mask_credentials_in_what_the_cluster_holds(monkeypatch):
    """A job submitted by other means (or an older addctl) may hold a credential in its entrypoint."""
    from orchestrator import cli
    from orchestrator.jobs import JobInfo

    entrypoint = "python -m orchestrator.cli run job.yaml --tracking-uri http://admin:pw-entry-9a8b@mlflow:5000"
    info = JobInfo("add-x-1", "RUNNING", entrypoint=entrypoint)

    class Fake:
        def info(self, job_id):
            return info

        def list(self):
            return [info]

    monkeypatch.setattr(cli, "_jobs_client", lambda address: Fake())
    for args in (["status", "add-x-1"], ["status", "add-x-1", "--json"], ["list"], ["list", "--json"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "pw-entry-9a8b" not in result.output
    assert "http://***@mlflow:5000" in CliRunner().invoke(main, ["status", "add-x-1"]).output
