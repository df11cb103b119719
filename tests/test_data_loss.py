"""Data loss is never silent: an unreadable shard counts all its rows as bad and fails the run once,
unretried, naming the shard; a few bad rows under ``max_bad_fraction`` are counted, per shard, in the
run's summary and its MLflow run. Real Ray, real Parquet shards (one overwritten with random bytes)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.spec import JobSpec
from tests.mlflow_server import TINY_CAPTIONS, tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=6, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def shards(folder: Path, rows: int = 16, per_shard: int = 8, bad_rows: tuple[int, ...] = ()) -> str:
    """A Parquet set of 16×16 images with a manifest; ``bad_rows`` hold bytes that are no image."""
    from workers.data.shards import write_shards
    from workers.eval.images import png_bytes

    rng = np.random.default_rng(0)
    records = [
        (
            b"not an image" if i in bad_rows else png_bytes((rng.random((16, 16, 3)) * 255).astype(np.uint8)),
            TINY_CAPTIONS[i % 4],
            i % 4,
        )
        for i in range(rows)
    ]
    write_shards(records, str(folder), rows_per_shard=per_shard)
    return str(folder)


def scramble(path: Path) -> None:
    """Overwrite a shard with random bytes of the same size (what a broken upload leaves)."""
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


# ---- the data layer ---------------------------------------------------------------------------------


def test_an_unreadable_shard_counts_all_its_rows_and_is_a_recorded_failure(ray_cluster, tmp_path):
    from workers.data.ingest import ShardReadError, build_dataset, close_ledger, data_failure, data_report

    uri = shards(tmp_path / "data")
    scramble(tmp_path / "data" / "shard-00001.parquet")
    ledger = "ledger-unreadable"
    with pytest.raises(Exception) as err:
        build_dataset(uri, channels=3, resolution=16, ledger=ledger).take_all()
    assert isinstance(err.value, ShardReadError) or "ShardReadError" in str(err.value)
    assert "shard-00001.parquet" in str(err.value) and "all 8 rows lost" in str(err.value)
    failure = data_failure(ledger)
    assert failure and "shard-00001.parquet" in failure  # a restarted attempt will see it
    report = data_report(ledger)
    assert report["lost"][f"{uri}/shard-00001.parquet"]["rows"] == 8
    close_ledger(ledger)


def test_with_every_loss_allowed_an_unreadable_shard_is_skipped_and_reported(ray_cluster, tmp_path):
    from workers.data.ingest import build_dataset, close_ledger, data_failure, data_report

    uri = shards(tmp_path / "data")
    scramble(tmp_path / "data" / "shard-00000.parquet")
    ledger = "ledger-skipped"
    rows = build_dataset(uri, channels=3, resolution=16, max_bad_fraction=1.0, ledger=ledger).take_all()
    assert len(rows) == 8 and data_failure(ledger) is None
    report = data_report(ledger)
    assert report["lost_rows"] == 8 and list(report["lost"]) == [f"{uri}/shard-00000.parquet"]
    assert "cannot read" in report["lost"][f"{uri}/shard-00000.parquet"]["reason"]
    close_ledger(ledger)


# ---- a whole run ------------------------------------------------------------------------------------


def tiny_run(tmp_path: Path, name: str, shard_uri: str, **sections) -> JobSpec:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = tiny_job(tmp_path, uri, name, **sections)
    job["data"]["uri"] = shard_uri
    return JobSpec.model_validate(job)


def test_a_run_with_an_unreadable_shard_fails_once_naming_it_without_a_retry(ray_cluster, tmp_path):
    """Retries allowed (max_failures 2), and every row is needed (16 rows for 4 steps of 4), so the
    broken shard is read: the run fails with the data layer's message; no attempt trains on."""
    from mlflow.tracking import MlflowClient

    from orchestrator.controller import run_job
    from workers.train.trainer import DataError

    data = shards(tmp_path / "data")
    scramble(tmp_path / "data" / "shard-00001.parquet")
    spec = tiny_run(tmp_path, "tiny-broken-shard", data, resources={"max_failures": 2})
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        run_job(spec, register=False)
    seconds = time.monotonic() - started
    assert "shard-00001.parquet" in str(err.value) and "all 8 rows lost" in str(err.value)
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.tracking.experiment).experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert parent.info.status == "FAILED" and "shard-00001.parquet" in parent.data.tags["job.error"]
    assert "shard-00001.parquet" in child.data.tags["data.error"]
    assert child.data.tags.get("train.status") != "completed" and "export.uri" not in child.data.tags
    assert not (tmp_path / "runs" / spec.name / "student").exists()  # nothing exported, nothing to register
    print(f"failed in {seconds:.0f} s")


def test_a_run_with_a_few_bad_rows_finishes_and_records_them(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.controller import run_job

    data = shards(tmp_path / "data", bad_rows=(3,))  # 1 of shard-00000's 8 rows
    spec = tiny_run(tmp_path, "tiny-bad-rows", data, data={"max_bad_fraction": 0.2})
    result = run_job(spec, register=False)
    lost = result.data["lost_rows_by_shard"]
    assert lost == {f"{data}/shard-00000.parquet": 1}, result.data
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.get_run(result.best_run_id)
    assert run.data.metrics["data/lost_rows"] == 1 and run.data.metrics["data/bad_records"] >= 1
    recorded = json.loads(run.data.tags["data.lost"])
    assert recorded[f"{data}/shard-00000.parquet"]["rows"] == 1
    assert "cannot decode image" in recorded[f"{data}/shard-00000.parquet"]["reason"]
