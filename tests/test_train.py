"""Distributed ADD training on a real local Ray cluster: FSDP2 sharding, equivalence with one worker,
recovery from a killed worker, exact resume, a non-finite loss, object-storage errors.

One tiny class-conditioned pixel teacher (16×16), a Parquet set with one micro-batch per shard, 6
steps of global batch 8. Every run goes through ``build_trainer`` -> Ray Train -> Ray Data.

Why the two-worker run can be compared to a one-worker run step by step: the loop draws the noise of
micro-batch i on rank r from (seed, step, r·grad_accum + i), and with one micro-batch per shard Ray
Data's ordered split deals the shards out alternately. So 1 worker × grad_accum 2 sees the same
rows and the same noise as 2 workers × grad_accum 1. What differs is the order of float additions
(the gradient norm for clipping is a sum of per-shard sums), by an ulp; AdamW turns an ulp of
difference in a near-zero gradient into up to ±lr (1e-4) on that weight. Hence the tolerance for
losses and weights: 1e-3 relative, 1e-3 absolute (10·lr), rather than 0.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from orchestrator.spec import JobSpec
from tests.tiny_models import PIXEL_SIZE, save_tiny_pixel_unet
from workers.data.shards import write_shards
from workers.data.storage import StorageError

STEPS, BATCH, MICRO = 6, 8, 4
TOL = {"rtol": 1e-3, "atol": 1e-3}
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # more logical CPUs than cores: 2 training workers, Ray Data's tasks and the controller
    ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (PIXEL_SIZE, PIXEL_SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_data(uri: str, rows: int = 64) -> str:
    write_shards([(png(i), f"item {i}", i % 10) for i in range(rows)], uri, rows_per_shard=MICRO)
    return uri


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    teacher = save_tiny_pixel_unet(root / "teacher", conditioning="class")
    return {"root": root, "teacher": str(teacher), "data": write_data(str(root / "data"))}


def make_spec(assets, *, workers: int = 2, accum: int = 1, data: str | None = None, **train) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "tiny",
            "teacher": {"source": assets["teacher"]},
            "data": {"uri": data or assets["data"], "resolution": PIXEL_SIZE, "local_shuffle_buffer": 4},
            "loss": {"guidance_scale": 1.5},
            "train": {
                "steps": STEPS,
                "batch_size": BATCH,
                "grad_accum": accum,
                "log_every": 1,
                "checkpoint_every": 3,
                "lr_student": 1e-4,
                "lr_student_final": 2e-5,  # θ's cosine decay over 4 steps, then held: resumes follow it
                "lr_student_decay_steps": 4,
                "lr_discriminator": 1e-4,
                "ema_decay": 0.9,
                "sample_every": 3,  # the samples swap the EMA into the sharded student and back
                "discriminator_steps": 2,  # an extra heads' update per step: its own data and noise
                **train,
            },
            "resources": {"num_workers": workers, "max_failures": 2},
        }
    )


def metric_log(path):
    """A TrainCallback writing every report to a JSON-lines file (the workers share this machine)."""
    from workers.train.loop import TrainCallback

    class MetricLog(TrainCallback):
        def on_log(self, step, metrics):
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    return MetricLog()


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def fit(spec: JobSpec, storage: str, name: str, log=None, extra_callbacks=(), **kwargs):
    from workers.train.trainer import build_trainer, run_training

    callbacks = ([metric_log(log)] if log else []) + list(extra_callbacks)
    return run_training(build_trainer(spec, storage_path=storage, run_name=name, callbacks=callbacks, **kwargs))


def exported_unet(folder) -> dict[str, torch.Tensor]:
    with open(os.path.join(folder, UNET_FILE), "rb") as f:
        return load_safetensors(f.read())


def assert_same_weights(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def reference(ray_cluster, assets):
    """Uninterrupted runs: 2 FSDP workers, and 1 worker with grad_accum 2 (same global batch)."""
    storage, out = str(assets["root"] / "runs"), {}
    for name, workers, accum in (("two", 2, 1), ("one", 1, 2)):
        log = assets["root"] / f"{name}.jsonl"
        result = fit(make_spec(assets, workers=workers, accum=accum), storage, f"ref-{name}", log)
        assert result.return_value["status"] == "completed"
        out[name] = {"log": read_log(log), "unet": exported_unet(result.return_value["export_uri"])}
    return out


def test_fsdp_shards_the_student_and_matches_one_worker(reference):
    two, one = reference["two"]["log"], reference["one"]["log"]
    assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, STEPS + 1))
    first = two[0]
    # each rank holds about half of every sharded tensor (dim 0 split over 2; odd sizes 1/3..2/3)
    assert first["fsdp/sharded"] == 1.0 and first["world_size"] == 2
    assert 1 / 3 <= first["fsdp/local_fraction_min"] <= first["fsdp/local_fraction_max"] <= 2 / 3
    per_rank, single = first["memory/student_state_bytes_per_rank"], one[0]["memory/student_state_bytes_per_rank"]
    assert len(per_rank) == 2 and max(per_rank) / single[0] <= 0.55  # θ + AdamW state per rank vs one worker
    for key in ("loss/student", "loss/distill", "loss/D", "loss/G_adv", "grad_norm/student"):
        np.testing.assert_allclose([m[key] for m in two], [m[key] for m in one], **TOL, err_msg=key)
    assert_same_weights(reference["two"]["unet"], reference["one"]["unet"], **TOL)
    for key in ("lr/student", "throughput/samples_per_s", "time/data_wait_fraction", "memory/rss_bytes_max"):
        assert key in first
    # θ's learning rate of each step: 1e-4 at the first, a cosine down to 2e-5 at the fifth, held there
    expected = [2e-5 + 8e-5 * 0.5 * (1 + np.cos(np.pi * min(s / 4, 1))) for s in range(STEPS)]
    np.testing.assert_allclose([m["lr/student"] for m in two], expected, rtol=1e-9)
    assert expected[0] == pytest.approx(1e-4) and expected[4] == expected[5] == pytest.approx(2e-5)
    # the balance on every report (log_every 1): θ's gradient split on the step's first micro-batch, the
    # gradients at x̂θ, the heads one by one against chance; the split leaves training as it was (weights above)
    heads = len([k for k in first if k.startswith("heads/") and k.endswith("/auc")])
    assert heads >= 2 and first["heads/chance_loss_D"] == 2 * heads
    for m in two + one:
        for key in ("balance/grad_adv_theta", "balance/grad_distill_theta", "balance/cos_theta", "balance/ratio_x"):
            assert np.isfinite(m[key]), key
        assert m["balance/grad_adv_theta"] > 0 and m["balance/grad_distill_theta"] > 0
        assert 0 <= m["heads/auc_mean"] <= 1 and -1 <= m["balance/cos_theta"] <= 1
    # train.discriminator_steps: 2 reads a second micro-batch per step and rank for the extra update
    assert [m["data/micro_batches"] for m in two] == [2 * s for s in range(1, STEPS + 1)]
    assert [m["data/micro_batches"] for m in one] == [2 * 2 * s for s in range(1, STEPS + 1)]


def test_a_killed_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(
    ray_cluster, assets, reference, s3_server, tmp_path, mlflow_server
):
    from orchestrator.tracking import TrackingCallback
    from workers.train.loop import FaultInjection

    s3_server.create_bucket("ckpt")
    data = write_data("s3://ckpt/data")
    marker, log = tmp_path / "killed", tmp_path / "log.jsonl"
    fault = FaultInjection(rank=1, after_step=4, marker=str(marker))
    client = mlflow_server.client()
    run_id = client.create_run(client.create_experiment("killed-worker")).info.run_id
    tracking = TrackingCallback(mlflow_server.url, run_id)
    spec = make_spec(assets, data=data)
    result = fit(spec, "s3://ckpt/runs", "killed", log, extra_callbacks=[tracking], fault=fault)

    assert marker.exists(), "the fault was not injected"
    summary = result.return_value
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["restored_from_step"] == 3  # the checkpoint before the kill (taken after step 3)
    resumed = [m["step"] for m in read_log(log) if m["resume/restored_from_step"] == 3]
    assert resumed == [4, 5, 6]
    # step 4 was logged before the kill and replayed after the resume: MLflow has it once
    steps = [m.step for m in client.get_metric_history(run_id, "loss/distill")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    assert any(k.startswith("runs/killed/checkpoint_00000003_") for k in s3_server.keys("ckpt"))
    # deterministic data order, noise and reductions: the same student as the uninterrupted run
    body = s3_server.client().get_object(Bucket="ckpt", Key=f"runs/killed/student/{UNET_FILE}")["Body"].read()
    assert_same_weights(load_safetensors(body), reference["two"]["unet"])
    assert "runs/killed/student/add_student.json" in s3_server.keys("ckpt")
    _assert_no_credentials_in_ray_logs(ray_cluster, s3_server)


def test_stop_and_resume_equals_the_uninterrupted_run(ray_cluster, assets, reference):
    storage = str(assets["root"] / "runs")
    spec = make_spec(assets)
    stopped = fit(spec, storage, "resumed", stop_at_step=2).return_value
    assert stopped["status"] == "stopped" and stopped["step"] == 2 and stopped["export_uri"] is None
    # fork the stopped run (Ray keeps checkpoint names relative): resumed on 2 workers and on 1
    shutil.copytree(os.path.join(storage, "resumed"), os.path.join(storage, "resharded"))

    result = fit(spec, storage, "resumed").return_value
    assert result["status"] == "completed" and result["restored_from_step"] == 2
    assert_same_weights(exported_unet(result["export_uri"]), reference["two"]["unet"])  # exact on CPU

    # another number of workers: DCP reshards θ, its AdamW state and the EMA; the data position
    # is kept in rows. Not bit-exact: accumulation instead of a reduce-scatter changes float order.
    result = fit(make_spec(assets, workers=1, accum=2), storage, "resharded").return_value
    assert result["status"] == "completed" and result["restored_from_step"] == 2
    assert_same_weights(exported_unet(result["export_uri"]), reference["two"]["unet"], **TOL)


def test_a_finished_job_run_again_with_more_steps_replaces_its_export(ray_cluster, assets, reference):
    from workers.add.export import STUDENT_FILE

    storage = str(assets["root"] / "runs")
    shutil.copytree(os.path.join(storage, "ref-one"), os.path.join(storage, "longer"))
    result = fit(make_spec(assets, workers=1, accum=2, steps=STEPS + 2), storage, "longer").return_value
    assert result["status"] == "completed" and result["restored_from_step"] == STEPS
    with open(os.path.join(result["export_uri"], STUDENT_FILE)) as f:
        assert json.load(f)["step"] == STEPS + 2
    longer = exported_unet(result["export_uri"])
    assert any(not torch.equal(longer[k], reference["one"]["unet"][k]) for k in longer)


@pytest.mark.parametrize(
    ("discriminator_steps", "first_bad"),
    [(1, r"loss/student=(inf|nan)"), (2, r"loss/D(_real|_fake)?=(inf|nan)")],
    ids=["joint update", "extra heads' update"],
)
def test_a_non_finite_loss_stops_the_run_at_that_step_keeping_the_last_good_checkpoint(
    ray_cluster, assets, tmp_path, discriminator_steps, first_bad
):
    from workers.train.trainer import NonFiniteLossError

    # lr 1e30: after one AdamW step every weight is ~1e30, and step 2's losses overflow; with an extra
    # heads' update, that update comes first in step 2 and its fake is already non-finite
    spec = make_spec(
        assets, lr_student=1e30, checkpoint_every=1, steps=4, discriminator_steps=discriminator_steps
    )
    storage = str(tmp_path / "runs")
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step 2: .*{first_bad}") as err:
        fit(spec, storage, "diverged")
    assert err.value.step == 2
    assert os.path.basename(err.value.checkpoint.path).startswith("checkpoint_00000001_")
    assert [p for p in os.listdir(os.path.join(storage, "diverged")) if p.startswith("checkpoint_0")] == [
        os.path.basename(err.value.checkpoint.path)
    ]
    assert not os.path.exists(os.path.join(storage, "diverged", "student"))  # nothing exported


def test_unreachable_storage_or_wrong_bucket_is_a_clear_error_without_credentials(
    ray_cluster, assets, s3_server, monkeypatch, caplog
):
    from workers.train.trainer import build_trainer

    s3_server.create_bucket("runs")
    caplog.set_level(logging.DEBUG)  # botocore's debug lines included: none may show a credential
    spec = make_spec(assets, workers=1)
    spec.storage.options = {"connect_timeout": "1", "max_attempts": "1"}  # fail fast
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/runs .*bucket 'no-such-bucket' does not exist") as e1:
        build_trainer(spec, storage_path="s3://no-such-bucket/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError, match=r"s3://runs/x \(endpoint http://127.0.0.1:9\): storage unreachable") as e:
        build_trainer(spec, storage_path="s3://runs/x")
    for text in (str(e1.value), str(e.value), caplog.text):
        assert s3_server.secret_key not in text and s3_server.access_key not in text


def _assert_no_credentials_in_ray_logs(ray_cluster, s3_server) -> None:
    logs_dir = ray_cluster._private.worker._global_node.get_logs_dir_path()
    for root, _, files in os.walk(logs_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                content = f.read()
            assert s3_server.secret_key.encode() not in content, name
            assert s3_server.access_key.encode() not in content, name


def test_local_paths_become_absolute_and_uris_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    spec = JobSpec.model_validate(
        {"name": "paths", "teacher": {"source": "teacher"}, "data": {"uri": "data/shards"}, "storage": {"uri": "runs"}}
    )
    out = spec.localized()
    assert out.teacher.source == str(tmp_path / "teacher")
    assert (out.data.uri, out.storage.uri) == (str(tmp_path / "data" / "shards"), str(tmp_path / "runs"))
    remote = spec.model_copy(
        update={
            "teacher": spec.teacher.model_copy(update={"source": "stabilityai/sd-turbo"}),
            "data": spec.data.model_copy(update={"uri": "s3://bucket/shards"}),
        }
    )
    out = remote.localized()
    assert (out.teacher.source, out.data.uri) == ("stabilityai/sd-turbo", "s3://bucket/shards")


def test_the_discriminator_section_reaches_the_built_discriminator(assets):
    from workers.train.models import build_models

    spec = make_spec(assets)
    spec = spec.model_copy(
        update={
            "discriminator": spec.discriminator.model_copy(
                update={"t_hat_loc": -2.0, "t_hat_scale": 0.5, "text_rms": False}
            )
        }
    )
    D = build_models(spec, torch.device("cpu")).discriminator
    F = D.feature_network
    assert (F.t_hat_loc, F.t_hat_scale, D.text_rms) == (-2.0, 0.5, False)
