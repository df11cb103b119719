"""``addctl``: help with examples everywhere, exit code 2 for bad input (and nothing started: no Ray
job, no MLflow run), validate / schema output, data preparation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
BAD_JOBS = sorted((ROOT / "tests" / "bad_jobs").glob("*.yaml"))
ADDCTL = Path(sys.executable).parent / "addctl"


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """A CLI runner whose embedded default lives in ``tmp_path`` (nothing written to ./runs)."""
    monkeypatch.setenv("ADD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.mark.parametrize("path", [p for p, _ in commands(main)], ids=" ".join)
def test_every_command_has_help_with_examples(path, runner):
    result = runner.invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command = dict(commands(main))[path]
    if not isinstance(command, click.Group):
        assert "Example" in result.output, f"addctl {' '.join(path)} --help shows no example"
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"addctl {' '.join(path)} {param.opts[0]} has no help"


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_validate_rejects_a_bad_job_with_exit_2_and_the_path(path, runner):
    expected = next(line for line in path.read_text().splitlines() if line.startswith("# expect: "))[10:]
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert expected in result.output


class Recorder(BaseHTTPRequestHandler):
    """An HTTP server standing in for a Ray dashboard: it records every request it gets."""

    requests: list[str] = []

    def _any(self):
        Recorder.requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_ray():
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_a_bad_job_starts_nothing(path, runner, tmp_path, fake_ray):
    """Rejected before anything is contacted: no request to Ray, no MLflow store, no local Ray."""
    import ray

    store = tmp_path / "mlflow.db"
    submitted = runner.invoke(main, ["submit", str(path), "--address", fake_ray])
    ran = runner.invoke(main, ["run", str(path), "--tracking-uri", f"sqlite:///{store}"])
    assert submitted.exit_code == 2 and ran.exit_code == 2, submitted.output + ran.output
    assert Recorder.requests == []  # no Ray job created
    assert not store.exists() and not (tmp_path / "home").exists()  # no MLflow run (not even a store)
    assert not ray.is_initialized()


def test_bad_overrides_exit_2_naming_the_path(runner):
    job = str(ROOT / "jobs" / "demo.yaml")
    result = runner.invoke(main, ["validate", job, "--set", "train.stepz=3", "--set", "loss.lambda_adv=-1"])
    assert result.exit_code == 2 and "train.stepz" in result.output
    result = runner.invoke(main, ["validate", job, "--set", "loss.lambda_adv=-1"])
    assert result.exit_code == 2 and "loss.lambda_adv" in result.output


def test_the_installed_entry_point_exits_2_for_a_bad_job():
    bad = ROOT / "tests" / "bad_jobs" / "missing_teacher.yaml"
    done = subprocess.run([str(ADDCTL), "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "teacher: required" in done.stderr
    done = subprocess.run([str(ADDCTL), "validate", "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2


def test_validate_prints_the_resolved_job(runner):
    result = runner.invoke(main, ["validate", str(ROOT / "jobs" / "demo.yaml"), "--set", "train.steps=7", "--print"])
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    assert job["train"]["steps"] == 7 and job["loss"]["lambda_distill"] == 2.5  # defaults filled in


def test_schema_prints_json_schema_and_markdown(runner):
    result = runner.invoke(main, ["schema"])
    schema = json.loads(result.output)
    assert schema["title"] == "ADD job" and {"name", "teacher", "data"} <= set(schema["required"])
    assert "SweepSpec" in schema["$defs"]
    assert runner.invoke(main, ["schema", "--format", "markdown"]).output == reference_markdown()


def test_a_secret_missing_on_this_machine_is_bad_input_naming_the_variable(runner, tmp_path):
    job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    job["env"] = {"HF_TOKEN": "${env:ADD_TEST_UNSET_VARIABLE}"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = runner.invoke(main, ["run", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2 and "ADD_TEST_UNSET_VARIABLE" in result.output and "env.HF_TOKEN" in result.output
    assert not (tmp_path / "x.db").exists()


def test_commands_without_what_they_need_exit_2(runner):
    assert runner.invoke(main, ["models", "list"]).exit_code == 2  # no store yet: says how to point at one
    assert runner.invoke(main, ["generate", "models:/x@champion"]).exit_code == 2  # no prompt
    assert runner.invoke(main, ["promote", "x", "1", "--force"]).exit_code == 2  # --force without --reason
    assert runner.invoke(main, ["stack", "status", "--dir", "nowhere"]).exit_code == 2
    assert runner.invoke(main, ["stack", "down", "--dir", "nowhere"]).exit_code == 2
    assert runner.invoke(main, ["validate", "no/such/job.yaml"]).exit_code == 2


def test_prepare_data_writes_fashion_mnist_shards(runner, tmp_path):
    from workers.data import read_manifest

    idx = Path("/usr/share/datasets/fashion-mnist")
    if not idx.is_dir():
        pytest.skip("Fashion-MNIST idx files not installed (package dataset-fashion-mnist)")
    out = tmp_path / "fmnist"
    result = runner.invoke(main, ["prepare-data", "fashion-mnist", str(out), "--limit", "40", "--rows-per-shard", "16"])
    assert result.exit_code == 0, result.output
    assert read_manifest(str(out))["rows"] == 40 and "3 shard(s)" in result.output
    missing = runner.invoke(main, ["prepare-data", "fashion-mnist", str(out), "--idx-dir", str(tmp_path / "none")])
    assert missing.exit_code == 2


def test_models_and_promote_on_a_registry(runner, tmp_path):
    """``models list/show`` and ``promote`` through the CLI on a local store (versions made by hand)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.promotion import eval_tags
    from orchestrator.registry import register_candidate
    from orchestrator.spec import PromotionSpec

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    gates = PromotionSpec(max_fid_ratio=1.0, alignment_margin=None, min_speedup=5.0)
    good = {"student_fid": 9.0, "teacher_fid": 10.0, "speedup": 40.0}
    bad = {"student_fid": 12.0, "teacher_fid": 10.0, "speedup": 40.0}
    for metrics in (good, bad):
        register_candidate(client, "demo", run.info.artifact_uri, run.info.run_id, tags=eval_tags(metrics, gates))
    flag = ["--tracking-uri", uri]
    listed = runner.invoke(main, ["models", "list", *flag])
    assert listed.exit_code == 0 and "demo" in listed.output and "candidate=2" in listed.output
    shown = runner.invoke(main, ["models", "show", "demo", *flag])
    assert shown.exit_code == 0 and "v1" in shown.output and "v2" in shown.output
    refused = runner.invoke(main, ["promote", "demo", "2", *flag])
    assert refused.exit_code == 1 and "fid" in refused.output
    promoted = runner.invoke(main, ["promote", "demo", "1", *flag])
    assert promoted.exit_code == 0 and "demo v1 is champion" in promoted.output
    assert str(client.get_model_version_by_alias("demo", "champion").version) == "1"
    detail = runner.invoke(main, ["models", "show", "demo", "1", *flag])
    assert "champion" in detail.output and "eval/student_fid" in detail.output
    assert runner.invoke(main, ["models", "show", "nope", *flag]).exit_code == 2
    assert runner.invoke(main, ["promote", "demo", "9", *flag]).exit_code == 2


def test_an_unreachable_cluster_is_a_clear_failure(runner):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    result = runner.invoke(main, ["list", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1 and "cannot reach the Ray dashboard" in result.output


def test_run_ends_with_the_balance_and_a_warning_a_person_cannot_miss(runner, tmp_path, monkeypatch):
    """What training said about the heads (``JobResult.warnings``, ``balance``) closes ``addctl run``'s output."""
    from orchestrator import controller, embedded

    warning = "the discriminator heads are at chance at step 50: L_D 7.98 of 8"
    result = controller.JobResult(parent_run_id="p", warnings=[warning], balance="step 50: ‖∇θ L_G‖/‖∇θ λ·L_distill‖ 9")
    monkeypatch.setattr(controller, "run_job", lambda spec, **kwargs: result)
    monkeypatch.setattr(embedded, "init_ray", lambda address, cpus: "a local Ray (stub)")
    out = runner.invoke(main, ["run", str(ROOT / "jobs" / "demo.yaml"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert f"WARNING: {warning}" in lines[-1]
    assert any(line.startswith("balance at the last report, step 50") for line in lines)


# ---- the developer commands: one real invocation each where it is cheap ------------------------------


def test_docs_checks_and_regenerates_the_job_file_reference(runner, tmp_path):
    readme = ROOT / "docs" / "job-reference.md"
    assert runner.invoke(main, ["docs", "--check", "--file", str(readme)]).exit_code == 0
    stale = tmp_path / "job-reference.md"
    stale.write_text(readme.read_text().replace("| `steps` |", "| `stepz` |", 1))
    assert runner.invoke(main, ["docs", "--check", "--file", str(stale)]).exit_code == 1
    written = runner.invoke(main, ["docs", "--file", str(stale)])
    assert written.exit_code == 0 and stale.read_text() == readme.read_text()
    (tmp_path / "plain.md").write_text("no markers\n")
    assert runner.invoke(main, ["docs", "--file", str(tmp_path / "plain.md")]).exit_code == 2


def test_toy_prints_its_table_and_writes_the_plot(runner, tmp_path):
    result = runner.invoke(main, ["toy", "--steps", "20", "--out", str(tmp_path / "toy")], catch_exceptions=False)
    assert result.exit_code == 0 and "| student 1-step |" in result.output
    assert (tmp_path / "toy" / "samples.png").stat().st_size > 0


def test_bench_step_times_one_add_iteration(runner, tmp_path):
    from tests.tiny_models import save_tiny_pixel_unet

    teacher = save_tiny_pixel_unet(tmp_path / "teacher", conditioning="sentence")
    args = ["bench", "step", "--teacher", str(teacher), "--batch-size", "4", "--image-size", "8",
            "--iters", "1", "--warmup", "0", "--threads", "1"]  # fmt: skip
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    timing = json.loads(result.output[result.output.index("{") :])  # after any warning of torch's profiler
    assert timing and all(isinstance(k, str) for k in timing)


def test_teacher_rows_of_a_job_without_a_table_is_bad_input(runner):
    result = runner.invoke(main, ["teacher", "rows", str(ROOT / "jobs" / "demo.yaml")])
    assert result.exit_code == 2 and "no eval.table section" in result.output


# ---- the console of `addctl run` ------------------------------------------------------------------


def test_training_progress_follows_the_child_runs_reports(tmp_path):
    """The training bar reads MLflow: a bar per child run, at its last reported step with its losses,
    closed when the run tags ``train.status``; another job's runs are not drawn."""
    import io

    from mlflow.tracking import MlflowClient

    from orchestrator.console import TrainingProgress

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("progress")
    parent = client.create_run(experiment).info.run_id
    other = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}, run_name="train").info.run_id
    client.create_run(experiment, tags={"mlflow.parentRunId": other})
    client.log_param(child, "train.steps", "20")
    stream = io.StringIO()
    progress = TrainingProgress(uri, stream, interval_s=60)
    progress.on_phase("training", parent)
    progress.poll()
    (bar,) = progress.bars.values()
    assert bar.total == 20 and bar.n == 0 and "starting" in bar.postfix
    for key, value in {"step": 10, "loss/student": 0.25, "loss/distill": 0.0125, "loss/D": 7.9}.items():
        client.log_metric(child, key, value, step=10)
    progress.poll()
    assert bar.n == 10 and bar.postfix == "L_G 0.250, L_distill 0.013, L_D 7.900"
    client.log_metric(child, "step", 20, step=20)
    client.set_tag(child, "train.status", "completed")
    progress.on_phase("evaluating", parent)
    assert progress.done == {child} and bar.n == 20 and progress._thread is None
    assert "ADD steps: 100%" in stream.getvalue() and "20/20" in stream.getvalue()


@pytest.mark.slow
def test_run_prints_a_short_console_and_names_the_log_that_holds_the_rest(tmp_path):
    """`addctl run` on a tiny job (a local Ray with its dashboard, MLflow in SQLite): a few lines (the
    bars, the result, where the runs and the log are); what Ray and its workers print (Ray Train's
    report of each step's metrics) is in the log it names. With -v it is on the console as well."""
    from tests.mlflow_server import tiny_job

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"PYTHONPATH": str(ROOT), "ADD_HOME": str(tmp_path / "home")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(name: str, *flags: str) -> tuple[list[str], Path]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_job(tmp_path, uri, name)))
        command = [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--num-cpus", "4", *flags]
        done = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=900)  # fmt: skip
        output = done.stdout.decode()
        assert done.returncode == 0, output[-4000:]
        lines = [line.split("\r")[-1] for line in output.split("\n")]  # lines as `wc -l` counts them, as shown
        log = tmp_path / "runs" / name / "run.log"
        assert f"log: {log.relative_to(tmp_path)}" in lines and log.is_file()
        return lines, log

    lines, log = run("tiny-console")
    console = "\n".join(lines)
    assert len(lines) <= 20, console
    assert "ADD steps: 100%" in console and "4/4" in console and "L_G " in console  # the training bar
    assert "evaluating student-add-1: 100%" in console
    assert any(line.startswith("registered tiny-console version 1 as candidate") for line in lines)
    assert any(line.startswith(f"runs: mlflow ui --backend-store-uri {uri}") for line in lines)
    assert "dashboard http://127.0.0.1:" in console
    detail = log.read_text()
    for chatter in ("Started a local Ray instance", "Reporting training result 4", "RayTrainWorker"):
        assert chatter in detail and chatter not in console, chatter
    assert '"model_name": "tiny-console"' in detail  # the whole result, as -v prints it

    lines, log = run("tiny-console-verbose", "-v")
    console = "\n".join(lines)
    assert "Started a local Ray instance" in console and "Reporting training result 4" in console
    assert '"model_name": "tiny-console-verbose"' in console
    assert "Reporting training result 4" in log.read_text()
