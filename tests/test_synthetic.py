"""Synthetic-data mode (LADD): the data job makes a shard set of the teacher's own samples (locally and
on S3), deterministic per seed and resumable; a job in synthetic mode checks the set's provenance,
trains with the distillation loss off, and MLflow records the mode and the manifest."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from workers.data.shards import MANIFEST_NAME, read_manifest, write_shards
from workers.data.synthetic import (
    PLAN_NAME,
    PromptError,
    SynthesisConfig,
    SyntheticDataError,
    batch_seed,
    check_provenance,
    plan_shards,
    read_prompts,
    synthesize,
)

PROMPTS = ["a black sneaker", "a white shirt", "a photo of a bag"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with more logical CPUs than cores (a teacher actor, and later a trainer and Ray Data)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("teacher") / "sd")


def config(teacher: Path, **kwargs) -> SynthesisConfig:
    """Two DDIM steps with CFG, two images per prompt, shards of 4 and teacher calls of 3 (so a shard
    spans two calls and the last shard is short)."""
    values = {"steps": 2, "images_per_prompt": 2, "batch_size": 3, "rows_per_shard": 4, "guidance_scale": 2.0}
    return SynthesisConfig(teacher=str(teacher), **(values | kwargs))


def rows(uri: str, options=None) -> list[dict]:
    """Every row of a shard set in the manifest's order."""
    from workers.data.storage import resolve

    fs, root = resolve(uri, options)
    out = []
    for shard in read_manifest(uri, options)["shards"]:
        out += pq.read_table(f"{root}/{shard['name']}", filesystem=fs).to_pylist()
    return out


# ---- the prompt set and the plan ----------------------------------------------------------------------


def test_prompt_files_are_checked_naming_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a sneaker \n\n a bag\n")
    assert read_prompts(path) == ["a sneaker", "a bag"]
    for text, message in (
        ("", r"prompts.txt: no prompts \(the file is empty"),
        ("\n  \n\t\n", "no prompts"),
        ("a bag\na coat\na bag\n", r"line 3: repeats line 1 \('a bag'\)"),
        ("ok\n" + "x" * 1001 + "\n", "line 2: a prompt of 1,001 characters, more than the 1,000 allowed"),
        ("a\x07bell\n", "line 1: a control character"),
    ):
        path.write_text(text)
        with pytest.raises(PromptError, match=message):
            read_prompts(path)
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptError, match=r"not UTF-8 text \(byte 3\)"):
        read_prompts(path)
    with pytest.raises(PromptError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_the_plan_is_prompt_major_and_seeds_are_a_pure_function_of_their_place():
    shards = plan_shards(PROMPTS, 2, 4)
    assert [s["name"] for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert shards[0]["captions"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and shards[0]["samples"] == [0, 1, 0, 1]
    assert len(shards[1]["captions"]) == 2
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2)
    assert len({batch_seed(0, 0, 0), batch_seed(0, 0, 1), batch_seed(0, 1, 0), batch_seed(1, 0, 0)}) == 4
    with pytest.raises(ValueError, match="solver: unknown teacher solver 'nope'; allowed: ddim, dpmpp"):
        SynthesisConfig(teacher="t", solver="nope")


# ---- the data job ---------------------------------------------------------------------------------------


def test_the_data_job_writes_a_shard_set_the_normal_ingest_reads(ray_cluster, teacher, tmp_path):
    from workers.data.ingest import build_dataset

    uri = str(tmp_path / "synthetic")
    progress = []
    manifest = synthesize(config(teacher), PROMPTS, uri, on_progress=lambda done, total: progress.append((done, total)))
    # an ordinary shard set: committed shards, a manifest, no plan or temporary file left
    assert sorted(os.listdir(uri)) == [MANIFEST_NAME, "shard-00000.parquet", "shard-00001.parquet"]
    assert manifest["rows"] == 6 and [s["rows"] for s in manifest["shards"]] == [4, 2]
    assert sorted(progress) == [(2, 6), (6, 6)] or sorted(progress) == [(4, 6), (6, 6)]
    # its provenance: the teacher and its sampler
    made = manifest["synthetic"]
    assert made["teacher"]["source"] == str(teacher) and len(made["teacher"]["fingerprint"]) == 64
    assert made["sampler"] == {"solver": "ddim", "steps": 2, "guidance_scale": 2.0}
    assert made["prompts"] == 3 and made["images_per_prompt"] == 2 and made["seed"] == 0
    # the rows: 16×16 RGB PNGs of the tiny teacher, captioned with their prompt
    table = rows(uri)
    assert [r["caption"] for r in table] == [p for p in PROMPTS for _ in range(2)]
    images = [np.asarray(Image.open(io.BytesIO(r["image"]))) for r in table]
    assert all(i.shape == (16, 16, 3) and i.dtype == np.uint8 for i in images)
    assert len({i.tobytes() for i in images}) == 6  # each sample its own noise
    # read back through the normal ingest
    ds = build_dataset(uri, resolution=16, channels=3, shuffle_files=False, shuffle_buffer=0, ledger=None)
    batch = ds.take_batch(10, batch_format="numpy")
    assert batch["pixels"].shape == (6, 3, 16, 16) and sorted(batch["caption"]) == sorted(r["caption"] for r in table)
    # same seed, same images (with another number of actors); another seed, other images
    again = tmp_path / "again"
    synthesize(config(teacher), PROMPTS, str(again), actors=2)
    assert [r["image"] for r in rows(str(again))] == [r["image"] for r in table]
    other = tmp_path / "other"
    synthesize(config(teacher, seed=1), PROMPTS, str(other))
    assert all(a["image"] != b["image"] for a, b in zip(rows(str(other)), table, strict=True))


def test_a_finished_set_is_refused_and_an_unfinished_one_resumed(ray_cluster, teacher, tmp_path):
    uri = str(tmp_path / "synthetic")
    first = synthesize(config(teacher), PROMPTS, uri)
    before = {n: os.path.getmtime(os.path.join(uri, n)) for n in os.listdir(uri)}
    with pytest.raises(SyntheticDataError, match="a finished synthetic set is there already .6 images.; overwrite"):
        synthesize(config(teacher), PROMPTS, uri)
    assert {n: os.path.getmtime(os.path.join(uri, n)) for n in os.listdir(uri)} == before  # untouched
    # a set interrupted after its first shard: the plan and shard 0 are there, no manifest
    kept = Path(uri, "shard-00000.parquet").read_bytes()
    os.remove(os.path.join(uri, MANIFEST_NAME))
    os.remove(os.path.join(uri, "shard-00001.parquet"))
    Path(uri, PLAN_NAME).write_text(json.dumps(_plan(teacher, uri, first)))
    with pytest.raises(SyntheticDataError, match=r"unfinished synthetic set made with other settings \(seed differ"):
        synthesize(config(teacher, seed=5), PROMPTS, uri)
    assert read_manifest(uri) is None
    resumed = synthesize(config(teacher), PROMPTS, uri)
    assert resumed["shards"] == first["shards"] and Path(uri, "shard-00000.parquet").read_bytes() == kept
    assert sorted(os.listdir(uri)) == [MANIFEST_NAME, "shard-00000.parquet", "shard-00001.parquet"]
    # asked to, a synthetic set is replaced; a real one never is
    replaced = synthesize(config(teacher, images_per_prompt=1), PROMPTS, uri, overwrite=True)
    assert replaced["rows"] == 3 and sorted(os.listdir(uri)) == [MANIFEST_NAME, "shard-00000.parquet"]
    real = str(tmp_path / "real")
    write_shards([(Path(uri, "shard-00000.parquet").read_bytes()[:8], "x", 0)], real)
    with pytest.raises(SyntheticDataError, match="a finished shard set that is not synthetic .1 rows.: it is never"):
        synthesize(config(teacher), PROMPTS, real, overwrite=True)
    assert sorted(os.listdir(real)) == [MANIFEST_NAME, "shard-00000.parquet"]


def _plan(teacher, uri, manifest) -> dict:
    """The plan the data job committed for ``config(teacher)`` (rebuilt: it is removed once the set is done)."""
    from workers.data.synthetic import _plan_document

    shards = plan_shards(PROMPTS, 2, 4)
    return _plan_document(config(teacher), PROMPTS, shards, manifest["synthetic"]["teacher"]["fingerprint"])


def test_a_failing_teacher_leaves_no_manifest_and_no_half_shard(ray_cluster, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    uri = str(tmp_path / "synthetic")
    with pytest.raises(Exception, match="unet"):
        synthesize(SynthesisConfig(teacher=str(broken), steps=1), PROMPTS, uri)
    assert [n for n in os.listdir(uri) if n != PLAN_NAME] == []


def test_the_data_job_writes_to_s3(ray_cluster, teacher, s3_server):
    s3_server.create_bucket("synthetic")
    manifest = synthesize(config(teacher), PROMPTS, "s3://synthetic/tiny")
    assert manifest["rows"] == 6
    keys = [k for k in s3_server.keys("synthetic") if not k.endswith("/")]
    assert keys == ["tiny/_manifest.json", "tiny/shard-00000.parquet", "tiny/shard-00001.parquet"]
    assert check_provenance("s3://synthetic/tiny", str(teacher))["synthetic"]["teacher_match"] is True
    assert [r["caption"] for r in rows("s3://synthetic/tiny")] == [p for p in PROMPTS for _ in range(2)]
    # read back through the normal ingest, from S3
    from workers.data.ingest import build_dataset

    batch = build_dataset("s3://synthetic/tiny", resolution=16, ledger=None).take_batch(10, batch_format="numpy")
    assert batch["pixels"].shape == (6, 3, 16, 16) and sorted(set(batch["caption"])) == sorted(PROMPTS)


# ---- a job in synthetic mode ------------------------------------------------------------------------------


def test_synthetic_mode_needs_a_set_made_by_the_jobs_teacher(ray_cluster, teacher, tmp_path):
    from tests.tiny_models import save_tiny_sdxl

    real = str(tmp_path / "real")
    write_shards([(b"png", "a caption", 0)], real)
    with pytest.raises(SyntheticDataError, match="this shard set was not made by a teacher"):
        check_provenance(real, str(teacher))
    with pytest.raises(SyntheticDataError, match="no finished shard set with a manifest; make one with"):
        check_provenance(str(tmp_path / "nothing"), str(teacher))
    uri = str(tmp_path / "synthetic")
    synthesize(config(teacher, images_per_prompt=1, rows_per_shard=8), PROMPTS, uri)
    assert check_provenance(uri, str(teacher))["synthetic"]["teacher_match"] is True
    other = save_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(SyntheticDataError, match=r"made by another teacher .*set data.allow_other_teacher: true"):
        check_provenance(uri, str(other))
    warnings = []
    made = check_provenance(uri, str(other), allow_other_teacher=True, warn=warnings.append)
    assert made["synthetic"]["teacher_match"] is False and "another teacher" in warnings[0]


def test_a_synthetic_job_with_lambda_distill_zero_trains_and_mlflow_shows_the_mode(ray_cluster, teacher, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.controller import run_job
    from orchestrator.spec import JobSpec
    from tests.mlflow_server import TINY_CAPTIONS, tiny_job

    uri = str(tmp_path / "synthetic")
    synthesize(config(teacher, images_per_prompt=2, rows_per_shard=4), TINY_CAPTIONS[:4], uri)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = tiny_job(
        tmp_path,
        tracking,
        "tiny-ladd",
        teacher={"source": str(teacher)},
        data={"uri": uri, "mode": "synthetic"},
        loss={"lambda_distill": 0.0},
        train={"steps": 2, "checkpoint_every": 2, "sample_every": 2, "log_every": 1},
    )
    spec = JobSpec.model_validate(job)
    result = run_job(spec, register=False)
    client = MlflowClient(tracking_uri=tracking)
    parent, child = client.get_run(result.parent_run_id), client.get_run(result.best_run_id)
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.tags["data.mode"] == child.data.tags["data.mode"] == "synthetic"
    assert child.data.params["data.mode"] == "synthetic" and child.data.params["loss.lambda_distill"] == "0.0"
    assert child.data.params["data.provenance.teacher"] == str(teacher)
    assert child.data.params["data.provenance.teacher_match"] == "true"
    assert child.data.params["data.provenance.solver"] == "ddim" and child.data.params["data.provenance.steps"] == "2"
    logged = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "data/manifest.json", str(tmp_path))).read_text()
    )
    assert logged["synthetic"]["teacher"]["source"] == str(teacher) and logged["rows"] == 8
    assert any("FID measures the distance to the teacher" in w for w in result.warnings)
    history = client.get_metric_history(result.best_run_id, "loss/student")
    assert [m.step for m in history] == [1, 2] and all(np.isfinite(m.value) for m in history)


def test_a_synthetic_job_on_a_plain_set_is_bad_input_and_starts_nothing(tmp_path, monkeypatch, teacher):
    from orchestrator.cli import main
    from tests.mlflow_server import tiny_job

    monkeypatch.setenv("ADD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = tmp_path / "mlflow.db"
    job = tiny_job(tmp_path, f"sqlite:///{store}", "plain-set", data={"mode": "synthetic"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "data.mode is synthetic, but this shard set was not made by a teacher" in result.output
    assert not store.exists()  # no MLflow run, no Ray started


def test_addctl_prepare_data_synthetic(ray_cluster, teacher, tmp_path, monkeypatch):
    from orchestrator.cli import main
    from tests.mlflow_server import tiny_job

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "made"
    job = tiny_job(tmp_path, f"sqlite:///{tmp_path / 'm.db'}", "cli-ladd", data={"uri": str(out), "mode": "synthetic"})
    job["teacher"]["source"] = str(teacher)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    runner = CliRunner()
    args = [
        "prepare-data",
        "synthetic",
        str(path),
        "--prompts",
        str(prompts),
        "--steps",
        "2",
        "--images-per-prompt",
        "2",
    ]
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    assert f"{out}: 6 images of 3 prompts in 1 shard(s), by {teacher} (ddim, 2 steps, CFG 5)" in done.output
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "a finished synthetic set is there already" in again.output
    solver = runner.invoke(main, [*args, "--overwrite", "--solver", "nope"])
    assert solver.exit_code == 2 and "solver: unknown teacher solver 'nope'" in solver.output
    prompts.write_text("")
    empty = runner.invoke(main, [*args, "--overwrite"])
    assert empty.exit_code == 2 and "no prompts" in empty.output
    assert read_manifest(str(out))["rows"] == 6  # the finished set is untouched
