"""The teacher job: plain diffusion training from Parquet shards, tracked in MLflow, exported for ADD.

A tiny fake Fashion-MNIST is prepared into shards as ``addctl prepare-data fashion-mnist`` would;
the job trains a few steps of batch 4 on it, in fp32 on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.errors import JobSpecError
from orchestrator.spec import load_job
from orchestrator.teacher_job import check_resumable, load_teacher_job, run_teacher_job, validate_teacher_job
from tests.test_data import tiny_fashion_mnist
from workers.add.components import load_teacher
from workers.data import prepare_fashion_mnist
from workers.data.fashion_mnist import pad_image
from workers.diffusion.train import ShardCaptions, minilm_encoder, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """23 fake Fashion-MNIST images as three shards, with the idx arrays they came from."""
    folder = tmp_path_factory.mktemp("fashion")
    (folder / "idx").mkdir()
    images, labels = tiny_fashion_mnist(folder / "idx")["train"]
    uri = str(folder / "shards")
    prepare_fashion_mnist(str(folder / "idx"), uri, rows_per_shard=10, seed=1)
    return {"uri": uri, "images": images, "labels": labels}


@pytest.fixture(scope="module")
def encoder():
    return minilm_encoder()


def teacher_job(folder: Path, uri: str, steps: int = 2) -> dict:
    return {
        "name": "tiny-teacher",
        "data": {"uri": uri},
        "train": {"steps": steps, "batch_size": 4, "warmup": 2, "checkpoint_every": 1, "bf16": False, "threads": 1},
        "output": {"run": str(folder / "run"), "export": str(folder / "teacher")},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "teacher-test"},
    }


def write(folder: Path, job: dict) -> Path:
    path = folder / "teacher.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_shard_source_holds_what_the_shards_hold(shards, encoder):
    data = ShardCaptions(encoder, shards["uri"])
    table = pq.read_table(shards["uri"])
    assert len(data) == table.num_rows == 23
    assert [data.captions[i] for i in data.caption_idx] == table.column("caption").to_pylist()
    assert data.labels.tolist() == table.column("label").to_pylist() == shards["labels"].tolist()
    padded = np.stack([pad_image(im) for im in shards["images"]]).astype(np.float32) / 127.5 - 1
    torch.testing.assert_close(data.x[:, 0], torch.from_numpy(padded), rtol=0, atol=1e-6)  # as the idx path
    assert len(data.captions) == len(set(data.captions)) and data.table.shape == (len(data.captions), 384)
    torch.testing.assert_close(data.table, encoder.encode(data.captions).pooled, rtol=0, atol=1e-5)
    assert data.config["images"] == 23 and data.config["skipped"] == 0

    # A batch: the drawn images with their own captions; dropped ones get the empty prompt's embedding.
    x0, cond = data.batch(torch.Generator().manual_seed(5), 6, caption_dropout=0.0)
    idx = torch.randint(len(data), (6,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, data.x[idx]) and torch.equal(cond, data.table[data.caption_idx[idx]])
    _, dropped = data.batch(torch.Generator().manual_seed(5), 6, caption_dropout=1.0)
    assert torch.equal(dropped, encoder.null(6).pooled)


def test_training_from_shards_resumes_exactly(shards, encoder, tmp_path):
    data = ShardCaptions(encoder, shards["uri"])
    kwargs = dict(batch_size=4, checkpoint_every=2, bf16=False, warmup=2, data=data)
    train(tmp_path / "straight", steps=4, **kwargs)
    train(tmp_path / "resumed", steps=2, **kwargs)
    train(tmp_path / "resumed", steps=4, **kwargs)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 4 and resumed["config"]["data"] == shards["uri"]
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=0, atol=0)


def test_teacher_job_trains_tracks_exports_and_resumes(shards, tmp_path):
    job = write(tmp_path, teacher_job(tmp_path, shards["uri"], steps=2))
    first = CliRunner().invoke(main, ["teacher", "train", str(job)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout[first.stdout.index("{") :])
    assert result["step"] == 2 and result["export"] == str(tmp_path / "teacher")

    # The export is a teacher the ADD jobs can load.
    teacher = load_teacher(result["export"])
    cond = teacher.encode_prompts(["a photo of a sneaker", "a bag"])
    x0 = teacher.denoise(torch.randn(2, 1, 32, 32), torch.tensor([500, 900]), cond, guidance_scale=3.0)
    assert x0.shape == (2, 1, 32, 32) and torch.isfinite(x0).all()

    # The MLflow run: the job as params, the loss at every checkpoint, the teacher folder.
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["job.kind"] == "teacher"
    params = run.data.params
    assert params["train.steps"] == "2" and params["train.batch_size"] == "4" and params["data.uri"] == shards["uri"]
    assert params["train.caption_dropout"] == "0.1" and params["data.images"] == "23"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2] and all(np.isfinite(m.value) for m in losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"teacher", "training.json", "job.yaml"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "teacher")}
    assert {"teacher/unet", "teacher/scheduler", "teacher/text_encoder.json", "teacher/training.json"} <= exported

    # Again with more steps: the run folder resumes at step 2, and the new run has the whole curve.
    again = run_teacher_job(load_teacher_job(job, ["train.steps=4"]))
    assert again.step == 4 and again.run_id != result["run_id"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    run = client.get_run(again.run_id)
    assert run.data.tags["resumed_from_step"] == "2" and run.data.params["train.steps"] == "4"
    assert sorted(m.step for m in client.get_metric_history(again.run_id, "loss")) == [1, 2, 3, 4]
    training = json.loads((tmp_path / "teacher" / "training.json").read_text())
    assert training["history"][-1]["step"] == 4 and training["config"]["data"] == shards["uri"]


def test_a_wrong_field_is_named(shards, tmp_path):
    job = teacher_job(tmp_path, shards["uri"])
    job["train"]["stepz"] = 3
    with pytest.raises(JobSpecError) as err:
        load_teacher_job(write(tmp_path, job))
    assert "train.stepz: unknown key" in str(err.value) and "steps" in str(err.value)

    good = write(tmp_path, teacher_job(tmp_path, shards["uri"]))
    with pytest.raises(JobSpecError, match=r"train\.caption_dropout: must be ≤ 1"):
        load_teacher_job(good, ["train.caption_dropout=1.5"])
    result = CliRunner().invoke(main, ["teacher", "train", str(good), "--set", "output.exprot=x"])
    assert result.exit_code == 2 and "output.exprot: unknown key in --set (did you mean export?)" in result.output

    # the shard source is validated as an ADD job's data section is
    with pytest.raises(JobSpecError, match=r"data\.storage_options\.endpoint: unknown storage option"):
        load_teacher_job(good, ["data.storage_options.endpoint=http://127.0.0.1:9000"])
    with pytest.raises(JobSpecError, match=r"data\.storage_options\.anonymous: must be true or false"):
        load_teacher_job(good, ["data.storage_options.anonymous=maybe"])
    with pytest.raises(JobSpecError, match="password in clear"):
        load_teacher_job(good, ["data.uri=s3://key:secret@bucket/shards"])


def test_missing_shards_are_a_clear_error_and_track_nothing(tmp_path):
    missing = str(tmp_path / "no-shards-here")
    spec = validate_teacher_job(teacher_job(tmp_path, missing))
    with pytest.raises(FileNotFoundError) as err:
        run_teacher_job(spec)
    message = str(err.value)
    assert message.startswith("data.uri: ") and missing in message and "addctl prepare-data fashion-mnist" in message
    assert not (tmp_path / "mlflow.db").exists()  # failed before any run was started
    result = CliRunner().invoke(main, ["teacher", "train", str(write(tmp_path, teacher_job(tmp_path, missing)))])
    assert result.exit_code == 2 and missing in result.output


def test_a_run_folder_of_other_data_is_not_resumed(shards, tmp_path):
    spec = validate_teacher_job(teacher_job(tmp_path, shards["uri"]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"steps": 6000}))  # a run of train.py on idx files
    with pytest.raises(JobSpecError, match=r"output\.run: .* the Fashion-MNIST idx files"):
        check_resumable(spec)


def test_the_shipped_teacher_job_has_the_shipped_teachers_settings():
    spec = load_teacher_job(ROOT / "jobs" / "fashion-mnist-teacher.yaml")
    t = spec.train
    shipped = json.loads((ROOT / "jobs" / "fashion-mnist" / "teacher" / "training.json").read_text())
    c = shipped["config"]
    assert t.steps == shipped["step"] and spec.output.weights == shipped["weights"]
    assert (t.batch_size, t.lr, t.warmup, t.ema_decay) == (c["batch_size"], c["lr"], c["warmup"], c["ema_decay"])
    assert (t.caption_dropout, t.seed, t.bf16) == (c["caption_dropout"], c["seed"], c["bf16"])
    assert spec.data.uri == "runs/data/fashion-mnist-train" and spec.output.export == "jobs/fashion-mnist/teacher"
    with pytest.raises(JobSpecError):  # a teacher job, not an ADD job
        load_job(ROOT / "jobs" / "fashion-mnist-teacher.yaml")
