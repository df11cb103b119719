"""Tracking: flattened params, secrets redacted, code version, runs against a real server, stopping on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.spec import JobSpec, dump_job
from orchestrator.tracking import (
    JobStopped,
    JobTracker,
    Redactor,
    TrackingCallback,
    code_version,
    flatten,
    numeric_metrics,
    secret_references,
    spec_dump,
    stop_on_signals,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(experiment: str = "tracking-tests", **extra) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "tracked",
            "teacher": {"source": "/models/teacher"},
            "data": {"uri": "s3://bucket/data", "storage_options": {"endpoint_url": "${env:S3_ENDPOINT}"}},
            "tracking": {"experiment": experiment},
            "env": {"HF_TOKEN": "${env:TRACKING_TEST_TOKEN}"},
            **extra,
        }
    )


def test_flatten_gives_dotted_params():
    flat = flatten({"train": {"lr": 1e-5, "betas": [0.0, 0.99], "prompts": []}, "name": "x", "opt": None})
    assert flat == {
        "train.lr": "1e-05",
        "train.betas": "[0.0, 0.99]",
        "train.prompts": "[]",
        "name": "x",
        "opt": "None",
    }
    assert len(flatten({"long": "x" * 7000})["long"]) == 6000
    params = flatten(spec_dump(tiny_spec()))
    assert params["train.lr_student"] == "1e-05" and params["discriminator.backbone"] == "teacher"
    assert params["env.HF_TOKEN"] == "${env:TRACKING_TEST_TOKEN}"


def test_redactor_hides_referenced_and_ambient_secrets(monkeypatch):
    monkeypatch.setenv("TRACKING_TEST_TOKEN", "hf_abcdefgh12345")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a 'TOKEN' that is no secret
    dump = spec_dump(tiny_spec())
    assert secret_references(dump) == {"S3_ENDPOINT", "TRACKING_TEST_TOKEN"}
    redact = Redactor.for_spec(dump)
    text = "token hf_abcdefgh12345, password correct-horse-battery, parallel false"
    assert redact(text) == "token ***, password ***, parallel false"


def test_code_version_names_the_commit(monkeypatch):
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    tags = code_version()
    assert tags["mlflow.source.git.commit"] == tags["code.git_commit"] == commit
    assert tags["code.git_dirty"] in ("true", "false")
    monkeypatch.setenv("ADD_CODE_VERSION", "v1.2.3")
    assert code_version()["code.version"] == "v1.2.3"


def test_numeric_metrics_drop_what_mlflow_cannot_take():
    report = {"loss": 0.5, "step": 3, "status": "running", "per_rank": [1.0], "nan": float("nan"), "flag": True}
    assert numeric_metrics(report) == {"loss": 0.5, "step": 3.0}


def test_tracker_parent_and_child_runs(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("TRACKING_TEST_TOKEN", "hf_secret_value_42")
    spec = tiny_spec("tracker-runs")
    tracker = JobTracker(spec, mlflow_server.url)
    parent = tracker.start_parent()
    tags = {"note": "token hf_secret_value_42", "endpoint": "http://minio:pw-in-uri-77@127.0.0.1:9000"}
    child = tracker.start_child(spec, "trial-0", params={"sweep.lr": 0.1}, tags=tags)
    tracker.log_metrics(child, {"loss": 1.0, "status": "running"}, step=1)
    tracker.log_metrics(child, {"loss": 0.5}, step=2)
    client = mlflow_server.client()
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["note"] == "token ***"
    assert run.data.params["sweep.lr"] == "0.1" and run.data.params["data.uri"] == "s3://bucket/data"
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(1, 1.0), (2, 0.5)]
    logged = Path(client.download_artifacts(parent, "job.yaml", str(tmp_path))).read_text()
    assert logged == dump_job(spec)

    tracker.end_all("KILLED")
    assert {client.get_run(r).info.status for r in (parent, child)} == {"KILLED"}
    assert mlflow_server.find_value("hf_secret_value_42") == []
    assert run.data.tags["endpoint"] == "http://***@127.0.0.1:9000" and mlflow_server.find_value("pw-in-uri-77") == []


def test_tracker_pickles_without_its_client(mlflow_server):
    import pickle

    tracker = JobTracker(tiny_spec("tracker-pickle"), mlflow_server.url)
    tracker.start_parent()
    copy = pickle.loads(pickle.dumps(tracker))
    assert copy.parent_run_id == tracker.parent_run_id and copy.client.tracking_uri == mlflow_server.url
    copy.end_all("FINISHED")
    assert mlflow_server.client().get_run(tracker.parent_run_id).info.status == "FINISHED"


def test_signal_raises_job_stopped_and_calls_on_stop():
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobStopped) as stopped:
        with stop_on_signals(seen.append):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert stopped.value.signum == signal.SIGTERM
    deadline = time.monotonic() + 2
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


STUCK = textwrap.dedent(
    """
    import signal, sys, threading, time
    from pathlib import Path
    from orchestrator.tracking import stop_on_signals

    def on_stop(signum):
        Path(sys.argv[1]).write_text(f"stopped by {signum}")

    with stop_on_signals(on_stop, grace_s=1.0):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # like a main thread stuck in ray.get
        # "blocked" comes from another thread once the main thread sits in C (sleep): a signal that
        # arrived while it still ran bytecode would be raised there, which is not the case tested
        threading.Timer(0.5, lambda: print("blocked", flush=True)).start()
        time.sleep(60)
    """
)


def test_stuck_main_thread_still_stops_and_exits_143(tmp_path):
    """The watcher runs on_stop at once and exits 128 + 15 when the main thread cannot raise."""
    marker = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(marker)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 3  # within ray job stop's grace before SIGKILL
        assert marker.read_text() == f"stopped by {int(signal.SIGTERM)}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_resumed_attempt_does_not_log_a_replayed_step_twice(mlflow_server):
    """Attempt 1 logs steps 1..6 and dies; attempt 2 restores the step-4 checkpoint and replays 5 and 6:
    each step appears once per metric (the values of the first attempt stay)."""
    import pickle

    tracker = JobTracker(tiny_spec("tracker-resume"), mlflow_server.url)
    parent = tracker.start_parent()
    child = tracker.start_child(tracker.spec, "resumed")
    first = TrackingCallback(mlflow_server.url, child)
    first.on_start({"restored_from_step": -1})
    for step in range(1, 7):
        first.on_log(step, {"loss": float(step), "lr": 0.1})
    second = pickle.loads(pickle.dumps(first))  # a new attempt's copy, as Ray ships it
    second.on_start({"restored_from_step": 4})
    for step in range(5, 9):
        second.on_log(step, {"loss": 100.0 + step, "lr": 0.1})
    history = mlflow_server.client().get_metric_history(child, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 9)) and len(steps) == len(set(steps))
    assert {m.step: m.value for m in history}[6] == 6.0 and {m.step: m.value for m in history}[7] == 107.0
    tracker.end_all("FINISHED")
    assert parent
