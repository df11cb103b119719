"""``addctl serve``: a real Serve application on a local Ray answering real HTTP requests, following
the registry's alias through a promotion without failing a request, refusing bad requests with a
4xx, and giving the bytes ``generate`` and the pyfunc give for the same prompt, steps and seed."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
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
from orchestrator.pyfunc import fluent_context
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


def test_a_model_reference_follows_an_alias_only_when_it_names_one():
    from orchestrator.served_model import ModelRef

    assert ModelRef.parse("demo@champion") == ModelRef("models:/demo@champion", "demo", alias="champion")
    assert ModelRef.parse("models:/demo/3") == ModelRef("models:/demo/3", "demo", version="3")
    assert ModelRef.parse("runs:/0123/student") == ModelRef("runs:/0123/student")
    with pytest.raises(ValueError, match="is not a model"):
        ModelRef.parse("not a model")


@pytest.mark.parametrize("merge", [True, False])
def test_the_batch_queue_merges_what_waits_up_to_the_limit(merge):
    import asyncio

    from orchestrator.batch_queue import BatchQueue

    calls, gate = [], threading.Event()

    def compute(items):
        gate.wait(10)  # the first call holds the thread while the rest queue up
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [item.upper() for item in items]

    async def scenario():
        queue = BatchQueue(compute, size=len, max_images=4, merge=merge)
        first = asyncio.ensure_future(queue.submit(["a"]))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(queue.submit(batch)) for batch in (["bb", "c"], ["d"], ["e"], ["f"])]
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(first, *rest)
        failed = await asyncio.gather(queue.submit(["boom"]), return_exceptions=True)
        return results, failed

    results, failed = asyncio.run(scenario())
    assert results == [["A"], ["BB", "C"], ["D"], ["E"], ["F"]]  # each caller its own results, in order
    if merge:  # sizes 2+1+1 fit in 4 images, "f" waits for the next call
        assert calls[:3] == [["a"], ["bb", "c", "d"], ["e", "f"]]
    else:
        assert calls[:6] == [["a"], ["bb"], ["c"], ["d"], ["e"], ["f"]]
    assert isinstance(failed[0], RuntimeError) and calls[-1] == ["boom"]


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
    return str(register_candidate(client, NAME, info.model_uri, run.info.run_id, model_id=info.model_id).version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite MLflow store with NAME v1 (4 student steps) as champion and v2 (2 steps) registered."""
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
    with fluent_context(uri, None):  # a version's source (models:/<id>) resolves in the fluent store, as in a job
        versions = []
        for n in (4, 2):
            student = Student(teacher, timesteps=student_timesteps(n))
            versions.append(register(client, uri, export_student(student, teacher, folder / f"s{n}"), str(teacher_dir)))
        client.set_registered_model_alias(NAME, "champion", versions[0])
        yield uri, client, versions


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


def png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def pyfunc_pngs(uri: str, version: str, prompts: list[str], steps: int, seed: int) -> list[bytes]:
    """What the registered version's pyfunc (in the registry at ``uri``) gives for these prompts."""
    import mlflow

    with fluent_context(uri, None):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    frame = model.predict(pd.DataFrame({"prompt": prompts}), params={"num_inference_steps": steps, "seed": seed})
    return list(frame["image"])


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("ADD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return CliRunner()


def test_serve_refuses_a_model_it_cannot_find_naming_it(registry, runner):
    uri, _, _ = registry
    nowhere = runner.invoke(main, ["serve", f"models:/{NAME}@nope", "--tracking-uri", uri])
    assert nowhere.exit_code == 2 and "Traceback" not in nowhere.output
    assert f"the alias 'nope' of registered model '{NAME}' points to no version" in nowhere.output
    assert "champion=v1" in nowhere.output  # the aliases it does have
    unknown = runner.invoke(main, ["serve", "models:/nobody@champion", "--tracking-uri", uri])
    assert unknown.exit_code == 2 and "no registered model named 'nobody'" in unknown.output
    assert runner.invoke(main, ["serve", "not a model", "--tracking-uri", uri]).exit_code == 2
    detached = runner.invoke(main, ["serve", f"models:/{NAME}@champion", "--tracking-uri", uri, "--detach"])
    assert detached.exit_code == 2 and "--detach needs a Ray cluster" in detached.output


# ---- a real server: `addctl serve` in a subprocess, on its own local Ray ---------------------------


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    """``addctl serve models:/NAME@champion`` on a free port: batches of up to 4 images, alias checked every second."""
    uri, client, versions = registry
    folder = tmp_path_factory.mktemp("serve-cli")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADD_HOME": str(folder)}  # Ray's workers import this checkout
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "orchestrator.cli", "serve", f"models:/{NAME}@champion", "--tracking-uri", uri,
               "--port", str(port), "--max-batch-size", "4", "--batch-wait-s", "0.05", "--poll-s", "1",
               "--max-prompt-chars", "40"]  # fmt: skip
    log = folder / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while "serving " not in log.read_text():
        assert process.poll() is None, f"addctl serve exited {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"addctl serve did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    try:
        yield url, uri, client, versions, process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_health_and_model_say_what_is_served(server):
    url, *_ = server
    assert get(url, "/health") == {"status": "ok", "version": "1"}
    info = get(url, "/model")
    assert (info["name"], info["alias"], info["version"], info["uri"]) == (NAME, "champion", "1", f"models:/{NAME}/1")
    assert info["steps"] == 4 and info["timesteps"] == [999, 749, 499, 249] and info["following"]
    assert info["teacher"].endswith("/teacher") and info["follow_error"] is None


def test_one_prompt_gives_a_png_and_several_give_json(server):
    url, *_ = server
    status, headers, body = post(url, {"prompt": "a black bag", "seed": 3})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-model-version"] == "1"
    assert png_array(body).shape == (16, 16, 3)
    status, headers, body = post(url, {"prompts": PROMPTS, "steps": 2})
    reply = json.loads(body)
    assert status == 200 and (reply["version"], reply["steps"], reply["seed"]) == ("1", 2, 0)
    images = [png_array(base64.b64decode(i)) for i in reply["images"]]
    assert len(images) == 3 and all(i.shape == (16, 16, 3) for i in images)
    assert not np.array_equal(images[0], images[1])  # each prompt its own noise and image


def test_served_bytes_are_the_pyfunc_and_generate_bytes(server, tmp_path):
    from orchestrator.generate import generate

    url, uri, *_ = server
    for steps, seed in ((1, 0), (4, 7)):
        status, headers, body = post(url, {"prompts": PROMPTS, "steps": steps, "seed": seed})
        assert status == 200 and headers["x-batch-images"] == "3"  # computed alone, one network call per step
        served = [base64.b64decode(i) for i in json.loads(body)["images"]]
        assert served == pyfunc_pngs(server[1], headers["x-model-version"], PROMPTS, steps, seed)
        grid = generate(f"models:/{NAME}@champion", PROMPTS, tmp_path / f"{steps}.png", steps=steps, seed=seed,
                        columns=3, tracking_uri=uri)  # fmt: skip
        cells = np.asarray(Image.open(grid))
        for i, png in enumerate(served):  # generate's grid: 2 px padding around 16 px cells
            np.testing.assert_array_equal(cells[2:18, 2 + 18 * i : 18 + 18 * i], png_array(png))


def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_stays_up(server):
    url, *_ = server
    bad = [
        (b"{nope", 400, "malformed JSON"),
        (b'{"steps": 1}', 400, "no prompt"),
        (b'{"prompts": []}', 400, "is empty"),
        (json.dumps({"prompt": "x" * 41}).encode(), 400, "at most 40"),
        (b'{"prompt": "a bag", "steps": 5}', 400, "steps must be in 1..4"),
        (json.dumps({"prompts": ["a bag"] * 5}).encode(), 413, "at most 4 per request"),
    ]
    for body, status, reason in bad:
        got, headers, text = post(url, body)
        error = json.loads(text)["error"]
        assert (got, reason in error, "\n" in error) == (status, True, False), (body, got, error)
    for path, status in (("/nope", 404), ("/generate", 405)):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}{path}", timeout=30)
        assert caught.value.code == status and json.load(caught.value)["error"]
    assert post(url, {"prompt": "a bag"})[0] == 200
    assert get(url, "/health")["status"] == "ok"


def test_concurrent_requests_share_a_batch_and_keep_their_own_noise(server):
    url, *_ = server
    barrier, replies = threading.Barrier(8), {}

    def ask(i):
        barrier.wait()
        replies[i] = post(url, {"prompt": PROMPTS[i % 3], "seed": i})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(replies) == list(range(8)) and all(r[0] == 200 for r in replies.values())
    assert max(int(r[1]["x-batch-images"]) for r in replies.values()) > 1  # some were computed together
    for i, (_, headers, png) in replies.items():  # the image each would get alone, up to a float's last bits
        alone = png_array(pyfunc_pngs(server[1], headers["x-model-version"], [PROMPTS[i % 3]], 1, i)[0]).astype(int)
        assert np.abs(png_array(png).astype(int) - alone).max() <= 1


def test_a_promotion_rolls_the_server_to_the_new_version_without_a_failed_request(server):
    url, uri, client, versions, *_ = server
    stop, answers = threading.Event(), []

    def keep_asking(worker):
        for n in range(300):  # bounded: about 30 s at most on this machine
            if stop.is_set():
                return
            status, headers, _ = post(url, {"prompt": "a white dress", "seed": n, "format": "json"})
            answers.append((time.monotonic(), worker, status, headers.get("x-model-version")))

    clients = [threading.Thread(target=keep_asking, args=(w,)) for w in range(2)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    promoted = CliRunner().invoke(main, ["promote", NAME, versions[1], "--force", "--reason", "serving test",
                                         "--tracking-uri", uri])  # fmt: skip
    assert promoted.exit_code == 0, promoted.output
    deadline = time.monotonic() + 60
    while get(url, "/model")["version"] != versions[1]:
        assert time.monotonic() < deadline, "the server did not follow the promotion"
        time.sleep(0.2)
    switched = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for t in clients:
        t.join(120)
    assert [a for a in answers if a[2] != 200] == []  # zero failed requests
    seen = [a[3] for a in sorted(answers)]
    assert seen[0] == versions[0] and seen[-1] == versions[1], seen
    assert all(a[3] == versions[1] for a in answers if a[0] > switched + 0.5)  # one replica: no way back
    assert get(url, "/model")["steps"] == 2


def test_an_alias_that_vanishes_leaves_the_served_version_answering(server):
    url, uri, client, versions, *_ = server
    client.delete_registered_model_alias(NAME, "champion")
    try:
        deadline = time.monotonic() + 30
        while not (get(url, "/model")["follow_error"] or ""):
            assert time.monotonic() < deadline, "the server did not notice the alias is gone"
            time.sleep(0.2)
        info = get(url, "/model")
        assert "points to no version" in info["follow_error"] and info["version"] == versions[1]
        assert post(url, {"prompt": "a bag"})[0] == 200
    finally:
        client.set_registered_model_alias(NAME, "champion", versions[1])


def test_ctrl_c_stops_the_server_and_frees_its_port(server):
    url, *_, process, port = server
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_serve_bench_measures_every_level_against_one_process(registry, runner, tmp_path, monkeypatch):
    """The benchmark command end to end, tiny (a local Ray in this process, after the server's is gone)."""
    uri, _, _ = registry
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "bench.json"
    result = runner.invoke(main, ["serve-bench", f"models:/{NAME}@champion", "--tracking-uri", uri, "--clients", "1,4",
                                  "--requests", "8", "--repeats", "2", "--max-batch-size", "4", "--port",
                                  str(free_port()), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["clients"]) for r in rows] == [
        ("one process", 1), ("serve, batching", 1), ("one process", 4), ("serve, batching", 4),
        ("serve, no batching", 1), ("serve, no batching", 4), ("serve, GET /health", 4),
    ]  # fmt: skip
    assert all(r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert all(r["mean_batch"] == 1 for r in rows if r["mode"] == "serve, no batching")
    assert "| serve, batching | 4 | 8 |" in result.output and "goal ≥ 0.8×" in result.output
    import ray

    assert not ray.is_initialized()
