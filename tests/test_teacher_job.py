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
    table = data.embeddings.rows.pooled
    assert len(data.captions) == len(set(data.captions)) and table.shape == (len(data.captions), 384)
    torch.testing.assert_close(table, encoder.encode(data.captions).pooled, rtol=0, atol=1e-5)
    assert data.config["images"] == 23 and data.config["skipped"] == 0

    # A batch: the drawn images with their own captions; dropped ones get the empty prompt's embedding.
    x0, cond = data.batch(torch.Generator().manual_seed(5), 6, caption_dropout=0.0)
    idx = torch.randint(len(data), (6,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, data.x[idx]) and torch.equal(cond.pooled, table[data.caption_idx[idx]])
    _, dropped = data.batch(torch.Generator().manual_seed(5), 6, caption_dropout=1.0)
    assert torch.equal(dropped.pooled, encoder.null(6).pooled)


def test_caption_dropout_replaces_every_field_of_the_dropped_rows(shards):
    """With tokens (what the MMDiT reads), a dropped caption is the empty one in its tokens too."""
    data = ShardCaptions(minilm_encoder(text_tokens=8), shards["uri"])
    x0, cond = data.batch(torch.Generator().manual_seed(2), 64, caption_dropout=0.5)
    null = data.embeddings.null
    assert cond.prompt_embeds.shape == (64, 8, 384) and cond.pooled.shape == (64, 384)
    dropped = torch.tensor([torch.equal(p, null.pooled[0]) for p in cond.pooled])
    assert 10 < int(dropped.sum()) < 54  # about half
    for row, is_dropped in zip(cond.prompt_embeds, dropped, strict=True):
        assert torch.equal(row, null.prompt_embeds[0]) == bool(is_dropped)


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


TINY_MMDIT = {"architecture": "sd3", "width": 32, "depth": 2, "head_dim": 16, "patch_size": 4, "text_tokens": 8}


def test_an_sd3_teacher_job_trains_resumes_and_exports_a_pixel_mmdit_teacher(shards, tmp_path):
    """network.architecture sd3: an SD3Transformer2DModel on pixels, trained by rectified flow, exported
    with the token count it reads, loaded by load_teacher as an SD3 teacher with a sentence encoder."""
    job = teacher_job(tmp_path, shards["uri"], steps=2) | {"network": TINY_MMDIT}
    first = CliRunner().invoke(main, ["teacher", "train", str(write(tmp_path, job))], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    again = run_teacher_job(load_teacher_job(write(tmp_path, job), ["train.steps=3"]))  # resumes at step 2
    assert again.step == 3

    folder = tmp_path / "teacher"
    assert (folder / "transformer" / "config.json").is_file() and not (folder / "unet").exists()
    assert json.loads((folder / "text_encoder.json").read_text())["max_length"] == 8
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.0

    teacher = load_teacher(str(folder))
    assert type(teacher.unet).__name__ == "SD3Transformer2DModel" and teacher.codec is None
    assert teacher.schedule.is_flow and teacher.schedule.prediction_type == "flow"
    assert teacher.unet.config.num_layers == 2 and teacher.unet.config.patch_size == 4
    cond = teacher.encode_prompts(["a photo of a sneaker", "a bag"])
    assert cond.prompt_embeds.shape == (2, 8, 384) and cond.pooled.shape == (2, 384)
    x0 = teacher.denoise(torch.randn(2, 1, 32, 32), torch.tensor([500, 999]), cond, guidance_scale=3.0)
    assert x0.shape == (2, 1, 32, 32) and torch.isfinite(x0).all()

    # The run folder holds an sd3 run: another network is refused before anything is tracked.
    wider = validate_teacher_job(job | {"network": TINY_MMDIT | {"width": 64}})
    with pytest.raises(JobSpecError, match=r"network: .* another network, width 32 \(job: 64\): its weights would"):
        check_resumable(wider)
    with pytest.raises(JobSpecError, match=r"network: .*architecture 'sd3' \(job: 'unet'\)"):
        check_resumable(validate_teacher_job({k: v for k, v in job.items() if k != "network"}))


def test_an_sd3_teacher_resumes_exactly(shards, tmp_path):
    from workers.diffusion.config import TeacherNetworkSpec

    network = TeacherNetworkSpec(**TINY_MMDIT)
    data = ShardCaptions(minilm_encoder(text_tokens=8), shards["uri"])
    kwargs = dict(batch_size=4, checkpoint_every=2, bf16=False, warmup=2, data=data, network=network)
    train(tmp_path / "straight", steps=4, **kwargs)
    train(tmp_path / "resumed", steps=2, **kwargs)
    train(tmp_path / "resumed", steps=4, **kwargs)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["config"]["network"]["architecture"] == "sd3"
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="resuming would not fit its weights"):
        train(tmp_path / "resumed", steps=5, **kwargs | {"network": TeacherNetworkSpec()})


def test_a_bad_network_is_named(shards, tmp_path):
    job = teacher_job(tmp_path, shards["uri"])
    with pytest.raises(JobSpecError, match=r"network\.architecture: .*'unet' or 'sd3'"):
        validate_teacher_job(job | {"network": {"architecture": "flux"}})
    with pytest.raises(JobSpecError, match=r"network: .*width 40 is not a multiple of head_dim 16"):
        validate_teacher_job(job | {"network": TINY_MMDIT | {"width": 40}})


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


def test_a_trained_pixel_mmdit_teacher_distils_exports_and_samples_as_the_student_sampler(shards, tmp_path):
    """The chain the flow benchmark runs, on a tiny MMDiT: the teacher job's training and export, one ADD
    iteration with both losses and LADD heads on the teacher's tokens (only θ and the heads learn),
    the student's export in the loader's layout, reloaded to sample exactly as ``sample_student``."""
    from workers.add.discriminator import build_discriminator
    from workers.add.export import export_student, load_student
    from workers.add.sampler import sample_student
    from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
    from workers.add.student import Student
    from workers.diffusion.config import TeacherNetworkSpec
    from workers.diffusion.train import export

    network = TeacherNetworkSpec(**TINY_MMDIT)
    data = ShardCaptions(minilm_encoder(text_tokens=8), shards["uri"])
    train(tmp_path / "run", steps=2, batch_size=4, bf16=False, warmup=2, data=data, network=network)
    teacher = load_teacher(str(export(tmp_path / "run", tmp_path / "teacher")))

    student = Student(teacher)
    D = build_discriminator("teacher", cond_dim=teacher.prompt_encoder.pooled_dim, teacher=teacher)
    assert D.feature_network.taps == ["transformer_blocks.0", "transformer_blocks.1"]  # the default taps
    models, objective = ADDModels(student, teacher, D), ADDObjective()
    opt_g = torch.optim.Adam(student.trainable_parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.trainable_parameters(), lr=1e-3)
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    before = {n: p.clone() for n, p in student.named_parameters()}
    x0, cond = data.batch(torch.Generator().manual_seed(0), 4, caption_dropout=0.0)
    batch = ADDBatch.from_pixels(teacher, x0, teacher.encode_prompts(["a bag", "a coat", "a shirt", "a dress"]))
    g = torch.Generator().manual_seed(1)
    metrics, fake = student_step(models, objective, batch, opt_g, g)
    assert metrics["loss/G_adv"] != 0 and metrics["loss/distill"] > 0
    d_metrics = discriminator_step(models, objective, batch, fake, opt_d, 0, g)
    assert np.isfinite(d_metrics["loss/D"])
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())

    export_student(student, teacher, tmp_path / "student")
    assert (tmp_path / "student" / "transformer").is_dir() and (tmp_path / "student" / "tokenizer").is_dir()
    reloaded, reloaded_teacher = load_student(tmp_path / "student")
    c1, c2 = teacher.encode_prompts(["a sneaker"]), reloaded_teacher.encode_prompts(["a sneaker"])
    assert c2.prompt_embeds.shape == (1, 8, 384)  # the token count travels with the exported tokenizer
    for steps in (1, 2, 4):
        a = sample_student(student, c1, (1, 1, 32, 32), steps, torch.Generator().manual_seed(3))
        b = sample_student(reloaded, c2, (1, 1, 32, 32), steps, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_shipped_flow_teacher_is_the_one_its_job_trains():
    """jobs/fashion-mnist/flow-teacher is what jobs/fashion-mnist-flow-teacher.yaml trained and exported:
    the same network, steps and settings, loaded as a pixel MMDiT with a flow schedule."""
    spec = load_teacher_job(ROOT / "jobs" / "fashion-mnist-flow-teacher.yaml")
    folder = ROOT / "jobs" / "fashion-mnist" / "flow-teacher"
    shipped = json.loads((folder / "training.json").read_text())
    c, t = shipped["config"], spec.train
    assert c["network"] == spec.network.model_dump() and spec.network.architecture == "sd3"
    assert t.steps == shipped["step"] and spec.output.weights == shipped["weights"] and c["data"] == spec.data.uri
    assert (t.batch_size, t.lr, t.warmup, t.ema_decay) == (c["batch_size"], c["lr"], c["warmup"], c["ema_decay"])
    assert (t.caption_dropout, t.seed, t.bf16) == (c["caption_dropout"], c["seed"], c["bf16"])
    assert spec.output.export == "jobs/fashion-mnist/flow-teacher"
    teacher = load_teacher(str(folder))
    assert type(teacher.unet).__name__ == "SD3Transformer2DModel" and teacher.schedule.is_flow
    assert teacher.unet.config.num_layers == spec.network.depth and teacher.prompt_encoder.max_length == 32
    assert load_job(ROOT / "jobs" / "fashion-mnist-flow.yaml").teacher.source == spec.output.export
