"""The main job (jobs/fashion-mnist.yaml), small: the shipped teacher and evaluator, a few hundred
Fashion-MNIST images prepared into shards, a few ADD steps on a local Ray, the benchmark table,
the student registered as `candidate` in MLflow. And the shipped teacher rows still describe the
shipped teacher under the job's protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "fashion-mnist.yaml"
FASHION = "/usr/share/datasets/fashion-mnist"
TEACHER = ROOT / "jobs" / "fashion-mnist" / "teacher"

pytestmark = pytest.mark.skipif(
    not Path(FASHION, "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)


def test_the_shipped_teacher_rows_are_those_of_the_shipped_teacher_under_the_jobs_protocol():
    from orchestrator.controller import eval_section
    from workers.eval.table import load_teacher_rows, protocol_key, teacher_fingerprint

    spec = load_job(JOB)
    fingerprint = teacher_fingerprint(spec.teacher.source)
    rows = load_teacher_rows(spec.eval.table.teacher_rows, fingerprint, protocol_key(eval_section(spec)))
    samplers = spec.eval.for_teacher(flow=False).table.teacher_samplers  # the DDPM teacher's defaults
    assert [f"{r.sampler.solver}:{r.sampler.steps}" for r in rows] == list(samplers)
    assert all(r.num_images == spec.eval.table.num_images for r in rows)
    reference = {f"{r.sampler.solver}:{r.sampler.steps}": r for r in rows}["ddim:50"]
    assert reference.alignment > 0.8, "the teacher's 50-step samples should show the prompt's class"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_main_job_small_prepares_trains_evaluates_writes_the_table_and_registers(
    tmp_path, mlflow_tracking, ray_local
):
    from orchestrator.controller import run_job
    from orchestrator.registry import CANDIDATE
    from workers.data import prepare_fashion_mnist

    prepare_fashion_mnist(FASHION, str(tmp_path / "train"), split="train", limit=256, rows_per_shard=128)
    prepare_fashion_mnist(FASHION, str(tmp_path / "test"), split="test", limit=200)
    results = tmp_path / "results"
    spec = load_job(
        JOB,
        [
            f"data.uri={tmp_path / 'train'}",
            "data.local_shuffle_buffer=16",
            "train.steps=3",
            "train.batch_size=8",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.sample_every=3",
            f"storage.uri={tmp_path / 'storage'}",
            f"tracking.uri={mlflow_tracking.url}",
            "tracking.experiment=fashion-mnist-small",
            "eval.teacher_steps=2",
            "eval.table.num_images=20",
            "eval.table.batch_size=10",
            "eval.table.teacher_samplers=[ddim:2, dpmpp:2]",
            "eval.table.reference_sampler=ddim:2",
            "eval.table.teacher_rows=null",
            f"eval.table.reference_uri={tmp_path / 'test'}",
            "eval.table.reference_images=200",
            f"eval.table.results_dir={results}",
        ],
    )
    result = run_job(spec)

    assert result.model_version == "1"
    table = (results / "table.md").read_text()
    for row in ("| teacher DDIM + CFG | 2 | 4 |", "| teacher DPM-Solver++ + CFG | 2 | 4 |", "| ADD student | 1 | 1 |",
                "| ADD student | 2 | 2 |", "| ADD student | 4 | 4 |"):
        assert row in table
    body = json.loads((results / "table.json").read_text())
    assert len(body["rows"]) == 5 and all(r["num_images"] == 20 for r in body["rows"])
    assert {p.name for p in results.iterdir()} >= {"samples.png", "fid_vs_nfe.png"}

    client = mlflow_tracking.client()
    version = client.get_model_version_by_alias(spec.tracking.model_name, CANDIDATE)
    assert version.version == "1"
    assert float(version.tags["eval/student_fid"]) == pytest.approx(body["metrics"]["student_fid"])
    run = client.get_run(result.best_run_id)
    assert run.data.metrics["eval/speedup"] > 1
    logged = {a.path for a in client.list_artifacts(result.best_run_id, "eval")}
    assert {"eval/table.md", "eval/table.json", "eval/samples.png", "eval/fid_vs_nfe.png"} <= logged


def test_teacher_rows_command_resumes_after_a_kill_and_retimes_the_written_rows(tmp_path, monkeypatch):
    import click
    from click.testing import CliRunner

    from orchestrator.cli import main
    from workers.data import prepare_fashion_mnist
    from workers.eval.protocol import Protocol
    from workers.eval.table import load_teacher_rows, teacher_fingerprint

    prepare_fashion_mnist(FASHION, str(tmp_path / "test"), split="test", limit=100)
    out, progress = tmp_path / "rows.json", tmp_path / "progress"
    args = ["teacher", "rows", str(JOB), "--out", str(out), "--progress", str(progress), "--threads", "1",
            "--set", "eval.table.num_images=12", "--set", "eval.table.batch_size=4",
            "--set", "eval.table.teacher_samplers=[ddim:2, dpmpp:1]", "--set", "eval.table.reference_sampler=ddim:2",
            "--set", f"eval.table.reference_uri={tmp_path / 'test'}", "--set", "eval.table.reference_images=100"]

    measure, calls = Protocol.measure, []

    def killed_in_the_second_row(self, sampler, generate, progress=None):
        calls.append(sampler.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(self, sampler, generate, progress)

    monkeypatch.setattr(Protocol, "measure", killed_in_the_second_row)
    with pytest.raises((KeyboardInterrupt, click.exceptions.Abort)):  # click turns Ctrl-C into Abort
        main.main(args, standalone_mode=False)
    assert not out.exists() and len(list((progress / "rows").iterdir())) == 1  # the first row is kept

    monkeypatch.setattr(Protocol, "measure", measure)
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    spec = load_job(JOB, [a for a in args[args.index("--set"):] if a != "--set"])
    from orchestrator.controller import eval_section
    from workers.eval.table import protocol_key

    key = protocol_key(eval_section(spec))
    rows = load_teacher_rows(out, teacher_fingerprint(spec.teacher.source), key)
    assert [r.sampler.key for r in rows] == ["teacher-ddim-2", "teacher-dpmpp-1"]
    assert all(r.num_images == 12 and r.fid > 0 for r in rows) and "DPM-Solver++" in out.with_suffix(".md").read_text()

    assert CliRunner().invoke(main, [*args, "--retime"], catch_exceptions=False).exit_code == 0
    retimed = load_teacher_rows(out, teacher_fingerprint(spec.teacher.source), key)
    assert [r.fid for r in retimed] == [r.fid for r in rows]  # scores untouched
    assert all(r.timing["timed"] == "by --retime" and r.timing["repeats"] >= 3 for r in retimed)
    assert retimed[0].speedup == pytest.approx(1.0)

    # kept batches are numbered in generation calls: another generation batch size is refused by name
    refused = CliRunner().invoke(main, [*args, "--set", "eval.table.generation_batch_size=2"])
    assert refused.exit_code == 2 and "generation_batch_size" in refused.output
