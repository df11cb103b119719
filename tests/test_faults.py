"""Real faults, not injected ones: the S3 server SIGKILLed and started again, a second Ray node's
raylet SIGKILLed mid-run.

The S3 server is ``tests.durable_s3`` (moto with its buckets on disk, so that a restart keeps them).
The Ray runs use one Ray head of this module's own (``ray start --head`` on 127.0.0.1) and, for the
node fault, a second node (``ray start --address``) that holds one of the two training workers.
Everything started here is stopped by its pid, also when a test fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from orchestrator import stack
from tests.durable_s3 import durable_s3_fixture  # noqa: F401  (the durable_s3 fixture)
from workers.data.storage import StorageError, StorageOptions, resolve
from workers.data.transfer import retrying_filesystem

pytestmark = pytest.mark.slow

WAIT_S = 240  # the longest any wait here may take on a loaded 2-core machine before the test fails


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


# ---- the storage layer alone ----------------------------------------------------------------------


def test_a_write_rides_out_a_restarting_s3_server_and_what_was_written_survives(durable_s3, caplog):
    durable_s3.create_bucket("bkt")
    fs = retrying_filesystem(resolve("s3://bkt/x")[0], "s3://bkt/x", StorageOptions(retry_s=60))
    _write(fs, "bkt/x/before", b"a" * 100_000)
    durable_s3.kill()
    restart = threading.Timer(3.0, durable_s3.start)
    restart.start()
    started = time.monotonic()
    try:
        _write(fs, "bkt/x/during", b"b" * 100_000)  # blocks while the server is down, then goes through
    finally:
        restart.join()
    assert time.monotonic() - started >= 3.0
    assert _read(fs, "bkt/x/before") == b"a" * 100_000  # written before the kill: kept by the server
    assert _read(fs, "bkt/x/during") == b"b" * 100_000
    assert "s3://bkt/x/during: could not write a file (attempt 1), retrying" in caplog.text
    assert durable_s3.secret_key not in caplog.text


def test_storage_down_for_longer_than_retry_s_is_a_storage_error_naming_the_uri(durable_s3, caplog):
    durable_s3.create_bucket("bkt")
    fs = retrying_filesystem(resolve("s3://bkt/x")[0], "s3://bkt/x", StorageOptions(retry_s=2))
    with pytest.raises(FileNotFoundError):  # not a connection error: no retry, the error as it was
        _read(fs, "bkt/x/missing")
    durable_s3.kill()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^s3://bkt/x/late: storage unreachable: could not write a file in \d "
                                           r"attempts over 2 s \(storage option retry_s\)") as err:  # fmt: skip
        _write(fs, "bkt/x/late", b"c" * 1000)
    assert 1.5 <= time.monotonic() - started < 10
    assert durable_s3.secret_key not in str(err.value) and durable_s3.access_key not in str(err.value)
    durable_s3.start()
    assert "x/late" not in durable_s3.keys("bkt")  # nothing half-written


# ---- a Ray cluster of this module's own -----------------------------------------------------------

STEPS = 6
NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port")  # fmt: skip
CHECKPOINT_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json", "rng/rank_00000.pt",
                    "rng/rank_00001.pt"}  # fmt: skip


@dataclass
class Head:
    gcs: str  # host:port of the head's GCS
    env: dict[str, str]  # the environment its processes run with
    service: stack.Service


@pytest.fixture(scope="module")
def head():
    """``ray start --head`` on 127.0.0.1 (6 CPUs: two training workers, Ray Data, a restart on this node
    alone) and this process connected to it; a node is declared dead after 3 missed health checks 1 s apart.

    It uses the default token file (``stack.default_token_path``), where this process's Ray looks for a
    token. Ray switches a process to token authentication when it starts a local cluster (as earlier test
    modules do), never when it connects to an address: here it is switched the same way."""
    import ray
    from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default

    folder = Path(tempfile.mkdtemp(prefix="addfault-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_AUTH", "RAY_ADDRESS", "AWS_"))}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    service = stack.start_ray_head(folder, num_cpus=6, object_store_mb=300, env=env)
    try:
        stack.wait_healthy([service], timeout_s=WAIT_S)
        assert enable_token_auth_by_default(), "RAY_AUTH_MODE is set to something other than token"
        ray.init(address=service.extra["gcs"], logging_level=logging.WARNING, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": service.extra["token_path"]}
        yield Head(service.extra["gcs"], env | token, service)
    finally:
        ray.shutdown()
        stack.stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)


class SecondNode:
    """``ray start --address`` joining ``head`` on this machine with 1 CPU: room for one training worker."""

    def __init__(self, head: Head, log: Path):
        import ray

        ports = [f"--{name}={port}" for name, port in zip(NODE_PORTS, stack.free_ports(len(NODE_PORTS)), strict=True)]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head.gcs}", "--block",
               "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", '--resources={"second_node": 1}',
               f"--object-store-memory={100 * 1024 * 1024}", "--disable-usage-stats", *ports]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=head.env, start_new_session=True
            )
        self.pids: set[int] = set()
        deadline = time.monotonic() + WAIT_S
        while not (nodes := [n for n in ray.nodes() if n["Alive"] and "second_node" in n["Resources"]]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the second Ray node did not join; see {log}")
            time.sleep(0.5)
        self.node_id = nodes[0]["NodeID"]

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet (its workers go with it); returns the raylet's pid."""
        self.pids |= set(stack.descendants(self.proc.pid))
        raylets = [pid for pid in self.pids if "/raylet" in _cmdline(pid).split(" ", 1)[0]]
        assert len(raylets) == 1, f"expected one raylet under pid {self.proc.pid}, found {raylets}"
        os.kill(raylets[0], signal.SIGKILL)
        return raylets[0]

    def stop(self) -> None:
        """Stop what this node started, by pid: ``ray start`` and every process seen below it."""
        self.pids |= set(stack.descendants(self.proc.pid))
        stack.stop_process(self.proc.pid, timeout_s=30, group_first=False)
        for pid in self.pids:
            if stack.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def second_node(head, tmp_path):
    node = SecondNode(head, tmp_path / "second-node.log")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.test_train import write_data
    from tests.tiny_models import save_tiny_pixel_unet

    root = tmp_path_factory.mktemp("faults")
    teacher = save_tiny_pixel_unet(root / "teacher", conditioning="class")
    return {"teacher": str(teacher), "data": write_data(str(root / "data"))}


def gate(after_step: int, reached: Path, go: Path):
    """A TrainCallback holding rank 0 after it logged ``after_step`` until the file ``go`` exists (once:
    a replayed step passes), having created ``reached``: the test injects its fault in that pause."""
    from workers.train.loop import TrainCallback

    class Gate(TrainCallback):
        def on_log(self, step, metrics):
            if step != after_step or go.exists():
                return
            reached.touch()
            deadline = time.monotonic() + WAIT_S
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.2)

    return Gate()


def _wait_for(condition, what: str, ended: threading.Event) -> None:
    """Return once ``condition()`` holds; raise when the run ``ended`` first or after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if ended.is_set() or time.monotonic() > deadline:
            raise TimeoutError(f"{'the run ended' if ended.is_set() else f'gave up after {WAIT_S} s'} before {what}")
        time.sleep(0.2)


def _tracked(mlflow_server, experiment: str):
    from orchestrator.tracking import TrackingCallback

    client = mlflow_server.client()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    return client, run_id, TrackingCallback(mlflow_server.url, run_id)


def _steps_in_mlflow(client, run_id: str, key: str = "loss/distill") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class Injector(threading.Thread):
    """Runs ``fault(ended)`` beside a run; ``ended`` is set when the run is over. Its error is kept."""

    def __init__(self, fault):
        super().__init__(daemon=True)
        self.fault, self.ended, self.error = fault, threading.Event(), None
        self.start()

    def run(self) -> None:
        try:
            self.fault(self.ended)
        except BaseException as err:  # noqa: BLE001  (the test reports it)
            self.error = err

    def finish(self) -> None:
        self.ended.set()
        self.join(WAIT_S)


# ---- the S3 server killed mid-run -----------------------------------------------------------------


def _registered(server, run: str) -> list[str]:
    """The checkpoints Ray Train's registry (its snapshot in the bucket) lists for ``run``."""
    key = f"runs/{run}/checkpoint_manager_snapshot.json"
    if key not in server.keys("ckpt", f"runs/{run}/"):
        return []
    body = server.client().get_object(Bucket="ckpt", Key=key)["Body"]
    return [c["checkpoint_dir_name"] for c in json.loads(body.read())["checkpoint_results"]]


def _assert_registered_checkpoints_are_whole(server, run: str) -> list[str]:
    registered = _registered(server, run)
    keys = server.keys("ckpt", f"runs/{run}/")
    for name in registered:
        files = {k.split(f"{name}/", 1)[1] for k in keys if f"/{name}/" in k and not k.endswith("/")}
        assert files == CHECKPOINT_FILES, (name, files)
    return registered


def _kill_after_checkpoint_2(durable_s3, run: str, reached, go, ended) -> None:
    """Once the run paused after step 3 and checkpoint 2 is registered, kill S3; then let the run go on."""
    try:
        _wait_for(lambda: reached.exists(), "step 3", ended)
        _wait_for(lambda: "checkpoint_00000002" in "".join(_registered(durable_s3, run)), "checkpoint 2", ended)
        durable_s3.kill()
    finally:
        go.touch()


def test_the_s3_server_killed_mid_run_and_restarted_the_run_waits_and_finishes(
    head, assets, durable_s3, mlflow_server, tmp_path
):
    from tests.test_train import fit, make_spec

    durable_s3.create_bucket("ckpt")
    client, run_id, tracking = _tracked(mlflow_server, "s3-restarted")
    reached, go = tmp_path / "reached", tmp_path / "go"
    restarted_at = []

    def fault(ended):  # after step 3 (checkpoint 2 registered): S3 down for 8 s, across step 4's checkpoint
        _kill_after_checkpoint_2(durable_s3, "s3", reached, go, ended)
        time.sleep(8)
        restarted_at.append(time.time())
        durable_s3.start()

    injector = Injector(fault)
    spec = make_spec(assets, steps=STEPS, checkpoint_every=2)
    try:
        result = fit(spec, "s3://ckpt/runs", "s3", extra_callbacks=[tracking, gate(3, reached, go)])
    finally:
        go.touch()
        injector.finish()
    assert injector.error is None and restarted_at, injector.error
    summary = result.return_value
    # the writes waited for the server: no attempt failed, nothing was replayed
    assert summary["status"] == "completed" and summary["step"] == STEPS and summary["restored_from_step"] == -1
    step4 = durable_s3.client().list_objects_v2(Bucket="ckpt", Prefix="runs/s3/checkpoint_00000004_")["Contents"]
    assert min(o["LastModified"].timestamp() for o in step4) >= restarted_at[0] - 1  # written once back
    registered = _assert_registered_checkpoints_are_whole(durable_s3, "s3")
    assert any(name.startswith("checkpoint_00000006_") for name in registered)
    assert "runs/s3/student/add_student.json" in durable_s3.keys("ckpt")
    assert _steps_in_mlflow(client, run_id) == list(range(1, STEPS + 1))


def test_the_s3_server_down_for_good_fails_the_run_naming_the_storage(head, assets, durable_s3, tmp_path):
    from tests.test_train import fit, make_spec

    durable_s3.create_bucket("ckpt")
    reached, go = tmp_path / "reached", tmp_path / "go"

    def fault(ended):
        _kill_after_checkpoint_2(durable_s3, "down", reached, go, ended)

    injector = Injector(fault)
    spec = make_spec(assets, steps=STEPS, checkpoint_every=2)
    spec.storage.options = {"retry_s": "2"}
    spec.resources.max_failures = 0
    try:
        with pytest.raises(StorageError, match=r"s3://ckpt/runs/down/.*storage unreachable: could not") as err:
            fit(spec, "s3://ckpt/runs", "down", extra_callbacks=[gate(3, reached, go)])
    finally:
        go.touch()
        injector.finish()
    assert injector.error is None, injector.error
    assert durable_s3.secret_key not in str(err.value) and durable_s3.access_key not in str(err.value)
    durable_s3.start()  # what the registry holds, after the restart: only whole checkpoints, none after the fault
    registered = _assert_registered_checkpoints_are_whole(durable_s3, "down")
    assert [name[:19] for name in registered] == ["checkpoint_00000002"]


# ---- a Ray node lost mid-run ----------------------------------------------------------------------


def test_a_second_nodes_raylet_killed_mid_run_the_run_resumes_on_the_head_and_finishes(
    head, second_node, assets, mlflow_server, tmp_path
):
    import ray

    from tests.test_train import fit, make_spec, read_log

    client, run_id, tracking = _tracked(mlflow_server, "node-lost")
    storage, log = tmp_path / "runs", tmp_path / "log.jsonl"
    reached, go = tmp_path / "reached", tmp_path / "go"
    snapshot = storage / "node" / "checkpoint_manager_snapshot.json"

    def fault(ended):  # after step 4 (checkpoint 3 registered): the second node's raylet SIGKILLed
        try:
            _wait_for(lambda: reached.exists(), "step 4", ended)
            registered = lambda: snapshot.exists() and "checkpoint_00000003" in snapshot.read_text()
            _wait_for(registered, "checkpoint 3", ended)
            second_node.kill_raylet()
        finally:
            go.touch()

    injector = Injector(fault)
    spec = make_spec(assets, steps=STEPS, checkpoint_every=3)
    try:
        result = fit(spec, str(storage), "node", log, extra_callbacks=[tracking, gate(4, reached, go)],
                     placement_strategy="SPREAD")  # fmt: skip
    finally:
        go.touch()
        injector.finish()
    assert injector.error is None, injector.error
    assert not next(n for n in ray.nodes() if n["NodeID"] == second_node.node_id)["Alive"]
    summary = result.return_value
    # one of the two workers was on the lost node: the run restarted from checkpoint 3, both workers on the head
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["restored_from_step"] == 3
    resumed = [m for m in read_log(log) if m["resume/restored_from_step"] == 3]
    assert [m["step"] for m in resumed] == [4, 5, 6] and {m["world_size"] for m in resumed} == {2}
    # step 4 was logged before the fault and again after the resume: MLflow has every step once
    assert _steps_in_mlflow(client, run_id) == list(range(1, STEPS + 1))
    assert (storage / "node" / "student" / "add_student.json").is_file()
