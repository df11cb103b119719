"""``addctl serve``: a real Serve application on a local Ray answering real HTTP requests, following
the registry's alias through a promotion without failing a request, refusing bad requests with a
4xx, and giving the bytes ``generate`` and the pyfunc give for the same prompt, steps and seed."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main
from orchestrator.serve_request import BadRequest, Limits, parse_request

ROOT = Path(__file__).resolve().parents[1]
NAME = "served"
PROMPTS = ["a photo of a sneaker", "a black bag", "a white dress"]
LIMITS = Limits(max_steps=4, max_prompts=4, max_prompt_chars=40)


# ---- requests, without a server ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 400, "no prompt"),
        (b'{"prompts": []}', 400, "is empty"),
        (b'{"prompts": "a bag"}', 400, "list of strings"),
        (b'{"prompts": ["a bag", "  "]}', 400, "prompt 1 is empty"),
        (b'{"prompts": [3]}', 400, "must be a string"),
        (json.dumps({"prompt": "x" * 41}).encode(), 400, "at most 40"),
        (json.dumps({"prompts": ["a"] * 5}).encode(), 413, "at most 4 per request"),
        (b'{"prompt": "a bag", "steps": 0}', 400, "steps must be in 1..4"),
        (b'{"prompt": "a bag", "steps": 5}', 400, "steps must be in 1..4"),
        (b'{"prompt": "a bag", "steps": 1.5}', 400, "steps must be an integer"),
        (b'{"prompt": "a bag", "seed": -1}', 400, "seed must be in"),
        (b'{"prompt": "a bag", "format": "gif"}', 400, "format must be one of"),
        (b'{"prompts": ["a", "b"], "format": "png"}', 400, "returns one image"),
        (b'{"prompt": "a", "prompts": ["b"]}', 400, "not both"),
        (b'{"prompt": "a", "guidance": 3}', 400, "unknown field 'guidance'"),
    ],
)
def test_a_bad_request_is_refused_with_one_line_naming_it(body, status, reason):
    with pytest.raises(BadRequest, match=reason) as caught:
        parse_request(body, LIMITS)
    assert caught.value.status == status and "\n" not in str(caught.value)


def test_a_good_request_has_its_defaults():
    one = parse_request(b'{"prompt": "a bag"}', LIMITS)
    assert (one.prompts, one.steps, one.seed, one.format) == (("a bag",), 1, 0, "png")
    many = parse_request(b'{"prompts": ["a", "b"], "steps": 4, "seed": 7}', LIMITS)
    assert (many.prompts, many.steps, many.seed, many.format) == (("a", "b"), 4, 7, "json")


# ---- a registry with two versions of a tiny student -------------------------------------------------


def register(client, uri: str, student_dir: Path, teacher: str) -> str:
    """Log ``student_dir`` as a run's pyfunc model and register it as a new version of NAME."""
    from orchestrator.pyfunc import log_student_model
    from orchestrator.registry import register_candidate

    experiment = client.get_experiment_by_name("serve") or client.get_experiment(
        client.create_experiment("serve", artifact_location=(student_dir.parent / "artifacts").as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    client.log_param(run.info.run_id, "teacher.source", teacher)
    info = log_student_model(run.info.run_id, str(student_dir), PROMPTS[:2], tracking_uri=uri)
    client.set_terminated(run.info.run_id)
    return register_candidate(client, NAME, info.model_uri, run.info.run_id, model_id=info.model_id).version


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite MLflow store with NAME v1 (4 student steps) as champion and v2 (2 steps) registered."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tests.tiny_models import save_tiny_pixel_unet
    from workers.add.components import load_teacher
    from workers.add.export import export_student
    from workers.add.student import Student, student_timesteps

    folder = tmp_path_factory.mktemp("serve-registry")
    teacher_dir = save_tiny_pixel_unet(folder / "teacher", conditioning="sentence")
    teacher = load_teacher(str(teacher_dir))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # a version's source (models:/<id>) resolves in the fluent store, as in a job
    try:
        versions = []
        for n in (4, 2):
            student = Student(teacher, timesteps=student_timesteps(n))
            versions.append(register(client, uri, export_student(student, teacher, folder / f"s{n}"), str(teacher_dir)))
        client.set_registered_model_alias(NAME, "champion", versions[0])
        yield uri, client, versions
    finally:
        mlflow.set_tracking_uri(previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body, timeout: float = 60) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(registry):
    """``orchestrator.serve.start`` on a local Ray: NAME@champion, batching on, polling every second."""
    import os

    import ray

    from orchestrator.serve import ServeOptions, start, stop

    uri, client, versions = registry
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # Ray's workers import this checkout's code
    options = ServeOptions(model=f"models:/{NAME}@champion", tracking_uri=uri, num_cpus=1, max_batch_size=4,
                           batch_wait_s=0.02, poll_s=1.0, max_prompt_chars=40)  # fmt: skip
    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        url = start(options, port=free_port())
        yield url, uri, client, versions
    finally:
        try:
            stop()
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


def test_smoke(server):
    url, uri, client, versions = server
    print(get(url, "/model"))
    status, headers, body = post(url, {"prompt": "a bag", "seed": 3})
    print(status, headers, body[:20])
    assert status == 200
