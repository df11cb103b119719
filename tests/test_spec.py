"""The job spec: bad files rejected with the field's path, overrides, secrets, the schema and the README
reference, the recipes, and the sections other modules read (eval, promotion, sweep)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.errors import JobSpecError
from orchestrator.reference import job_schema, readme_section, reference_markdown
from orchestrator.spec import (
    JobSpec,
    apply_overrides,
    dump_job,
    load_job,
    sweepable_paths,
    validate_job,
)
from workers.secrets import SecretError, apply_env, resolve_secrets

ROOT = Path(__file__).resolve().parents[1]
BAD_JOBS = sorted((ROOT / "tests" / "bad_jobs").glob("*.yaml"))
# Teacher jobs (jobs/*-teacher.yaml) are not ADD jobs: tests/test_teacher_job.py validates them.
GOOD_JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.stem.endswith("-teacher"))
MINIMAL = {"name": "ok", "teacher": {"source": "runs/teacher"}, "data": {"uri": "runs/data"}}


def header(path: Path, key: str) -> str | None:
    """A ``# key: value`` line of a bad job's header (what it must be rejected for)."""
    match = re.search(rf"^# {key}: (.+)$", path.read_text(), re.M)
    return match.group(1).strip() if match else None


def test_there_are_enough_bad_jobs():
    assert len(BAD_JOBS) >= 20


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_bad_job_is_rejected_naming_the_field(path):
    expected = header(path, "expect")
    with pytest.raises(JobSpecError) as err:
        load_job(path)
    message = str(err.value)
    assert any(p.path.startswith(expected) for p in err.value.problems), message
    assert str(path) in message  # names the file too
    if secret := header(path, "secret"):
        assert secret not in message  # a secret in clear is reported, never echoed


@pytest.mark.parametrize("path", GOOD_JOBS, ids=lambda p: p.stem)
def test_shipped_jobs_validate_and_round_trip(path):
    spec = load_job(path)
    assert JobSpec.model_validate(yaml.safe_load(dump_job(spec))) == spec


def test_defaults_fill_every_section():
    spec = validate_job(MINIMAL)
    assert spec.train.steps == 1000 and spec.resources.num_workers == 1 and spec.sweep is None
    assert spec.eval.teacher_steps == 50 and spec.promotion.min_speedup == 10.0
    assert spec.tracking.uri is None and spec.storage.uri == "runs"


def test_overrides_set_fields_by_path_and_parse_values_as_yaml():
    data = apply_overrides(
        MINIMAL,
        [
            "train.steps=20",
            "train.sample_prompts=[a, b]",
            "tracking.uri=null",
            "env.HF_HOME=/cache",
            "sweep.search_space.loss.lambda_distill={grid: [1, 2]}",
        ],
    )
    spec = validate_job(data)
    assert spec.train.steps == 20 and spec.train.sample_prompts == ["a", "b"] and spec.env == {"HF_HOME": "/cache"}
    assert spec.sweep.search_space["loss.lambda_distill"].grid == [1, 2]
    assert MINIMAL["name"] == "ok" and "train" not in MINIMAL  # the input is not modified


@pytest.mark.parametrize(
    "override, path",
    [
        ("train.stepz=3", "train.stepz"),
        ("nosuch=1", "nosuch"),
        ("train.steps.deeper=1", "train.steps"),
        ("no-equals-sign", "--set no-equals-sign"),
        ("train.sample_prompts=[a, b", "train.sample_prompts"),
    ],
)
def test_bad_override_names_its_path(override, path):
    with pytest.raises(JobSpecError) as err:
        apply_overrides(MINIMAL, [override])
    assert err.value.problems[0].path == path, str(err.value)


def test_override_with_a_bad_value_is_reported_at_its_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(JobSpecError) as err:
        load_job(job, ["train.steps=-5"])
    assert err.value.problems[0].path == "train.steps" and "≥ 1" in str(err.value)


def test_every_error_at_once():
    with pytest.raises(JobSpecError) as err:
        validate_job({"name": "Bad Name", "data": {"uri": 3}, "train": {"steps": 0, "extra": 1}})
    paths = {p.path for p in err.value.problems}
    assert {"name", "teacher", "data.uri", "train.steps", "train.extra"} <= paths


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(JobSpecError) as err:
        validate_job({**MINIMAL, "resources": {"gpus": 8}})
    assert "num_workers" in str(err.value) and "gpus_per_worker" in str(err.value)


# ---- secrets ----------------------------------------------------------------------------------------


def test_secret_references_are_resolved_only_where_the_job_runs(monkeypatch):
    spec = validate_job({**MINIMAL, "env": {"AWS_SECRET_ACCESS_KEY": "${env:MY_S3_SECRET}", "HF_HOME": "/c"}})
    assert spec.env["AWS_SECRET_ACCESS_KEY"] == "${env:MY_S3_SECRET}"  # the spec holds the reference
    assert "${env:MY_S3_SECRET}" in dump_job(spec)
    environ = {"MY_S3_SECRET": "value-1234"}
    assert resolve_secrets(spec.env, environ=environ) == {"AWS_SECRET_ACCESS_KEY": "value-1234", "HF_HOME": "/c"}
    monkeypatch.setenv("MY_S3_SECRET", "value-5678")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    assert apply_env(spec.env) == ["AWS_SECRET_ACCESS_KEY", "HF_HOME"]
    import os

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "value-5678"


def test_a_missing_variable_names_the_key_and_variable_not_a_value():
    with pytest.raises(SecretError) as err:
        resolve_secrets({"TOKEN": "${env:NOT_SET_ANYWHERE_42}", "OTHER": "plain"}, environ={"X": "y"})
    assert "env.TOKEN" in str(err.value) and "NOT_SET_ANYWHERE_42" in str(err.value)


@pytest.mark.parametrize("key", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD", "my_api_key"])
def test_secret_looking_keys_must_be_references(key):
    validate_job({**MINIMAL, "env": {key: "${env:SOMETHING}"}})
    with pytest.raises(JobSpecError) as err:
        validate_job({**MINIMAL, "env": {key: "clear-text-value-99"}})
    assert f"env.{key}" in str(err.value) and "clear-text-value-99" not in str(err.value)


# ---- schema and README ------------------------------------------------------------------------------


def test_schema_describes_every_field_in_one_line_and_forbids_unknown_keys():
    schema = job_schema()
    models = [schema, *schema["$defs"].values()]
    for model in models:
        assert model.get("additionalProperties") is False, model.get("title")
        for name, prop in model["properties"].items():
            description = prop.get("description", "")
            assert description and "\n" not in description, f"{model.get('title')}.{name}"
    json.dumps(schema)  # serialisable as is


def test_job_reference_is_generated_from_the_schema():
    section = readme_section((ROOT / "docs" / "job-reference.md").read_text())
    assert section is not None, "docs/job-reference.md lacks the job-reference markers"
    assert section == reference_markdown(), "run: addctl docs"


def test_readme_shows_the_flow():
    readme = (ROOT / "README.md").read_text()
    for stage in ("object storage", "Ray Data", "Ray Train", "FSDP", "MLflow", "registry", "promote"):
        assert stage in readme


# ---- what other modules read ------------------------------------------------------------------------


def test_sweep_paths_and_the_sections_the_controller_reads():
    """The controller reads the eval, promotion and sweep sections as they are: the spec's own models."""
    from orchestrator.controller import eval_section
    from orchestrator.sweep import param_space

    spec = load_job(ROOT / "jobs" / "demo-sweep.yaml", ["promotion.min_speedup=7"])
    config = spec.sweep
    assert config is not None and config.scheduler == "asha" and config.grace_period == 2
    assert set(config.search_space) == {"loss.lambda_distill", "train.lr_student"}
    assert config.num_samples == 2 and config.max_concurrent_trials == 2 and config.metric == "loss/distill"
    assert set(param_space(config.search_space)) == set(config.search_space)
    assert spec.promotion.min_speedup == 7 and spec.promotion.max_fid_ratio is None
    evaluation = eval_section(spec)
    assert evaluation.teacher_steps == 25 and evaluation.prompts == spec.eval.prompts
    assert "loss.lambda_distill" in sweepable_paths() and "name" not in sweepable_paths()


def test_eval_prompts_default_to_the_sample_prompts_and_the_table_reference_to_the_data():
    from orchestrator.controller import eval_section

    spec = load_job(ROOT / "jobs" / "fashion-mnist.yaml", ["eval.prompts=[]", "eval.table.reference_uri=null"])
    evaluation = eval_section(spec)
    assert evaluation.prompts == spec.train.sample_prompts and evaluation.table.reference_uri == spec.data.uri
    assert spec.eval.prompts == [] and spec.eval.table.reference_uri is None  # the job itself is untouched
    no_prompts = load_job(ROOT / "jobs" / "fashion-mnist.yaml", ["eval.prompts=[]", "train.sample_prompts=[]"])
    assert eval_section(no_prompts) is None


def test_the_table_needs_three_timed_calls_and_enough_images_for_recall():
    with pytest.raises(JobSpecError, match=r"eval.speed_repeats: .*at least 3"):
        load_job(ROOT / "jobs" / "fashion-mnist.yaml", ["eval.speed_repeats=2"])
    with pytest.raises(JobSpecError, match=r"eval.table.num_images: 9 is too few"):
        load_job(ROOT / "jobs" / "fashion-mnist.yaml", ["eval.table.num_images=9", "eval.table.k=4"])
    assert load_job(ROOT / "jobs" / "demo.yaml", ["eval.speed_repeats=1"]).eval.speed_repeats == 1  # no table


# ---- the SD 1.5 and SDXL recipes: their loading path on tiny models and S3 -----------------------


def write_laion_style(s3, bucket: str, prefix: str, shards: int = 2, per_shard: int = 3) -> None:
    """img2dataset-style webdataset tars (NNNNN.jpg + NNNNN.txt) on the test S3 server."""
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                jpg = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(jpg, format="JPEG")
                for ext, data in (("jpg", jpg.getvalue()), ("txt", f"a photo number {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        client.put_object(Bucket=bucket, Key=f"{prefix}/{shard:05d}.tar", Body=buf.getvalue())


@pytest.mark.parametrize("recipe, kind", [("sd15-laion", "sd"), ("sdxl-laion", "sdxl")])
def test_gpu_recipe_loads_its_teacher_and_streams_its_data(recipe, kind, tmp_path, s3_server):
    import pyarrow.fs as pafs

    from tests.tiny_models import save_tiny_sd, save_tiny_sdxl
    from workers.add.components import load_teacher
    from workers.add.text_encoders import CLIPPromptEncoder, SDXLPromptEncoder
    from workers.data.ingest import decode_image, list_shards
    from workers.data.storage import resolve, storage_options

    spec = load_job(ROOT / "jobs" / f"{recipe}.yaml")
    assert spec.resources.num_workers * spec.resources.gpus_per_worker == 8 and spec.resources.fsdp
    assert spec.data.uri.startswith("s3://") and spec.data.format == "webdataset"
    r = spec.resources
    assert r.num_workers * r.cpus_per_worker + r.data_cpus <= 80  # fits the 8 GPU pods of infra/k8s
    # the same job, on a tiny teacher of the same architecture and the test S3 server
    teacher_dir = (save_tiny_sd if kind == "sd" else save_tiny_sdxl)(tmp_path / "teacher")
    bucket, prefix = spec.data.uri[len("s3://") :].split("/", 1)
    write_laion_style(s3_server, bucket, prefix)
    spec = load_job(
        ROOT / "jobs" / f"{recipe}.yaml",
        [f"teacher.source={teacher_dir}", f"data.storage_options.endpoint_url={s3_server.endpoint_url}"],
    )
    resolve_secrets(spec.env, environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "HF_TOKEN": "c"})
    teacher = load_teacher(
        spec.teacher.source, prediction_type=spec.teacher.prediction_type, resolution=spec.teacher.resolution
    )
    encoder = teacher.prompt_encoder
    assert isinstance(encoder, SDXLPromptEncoder if kind == "sdxl" else CLIPPromptEncoder)
    assert teacher.codec is not None  # a latent teacher: the VAE came with it
    options = storage_options(spec.data.storage_options, "data.storage_options")
    names = list_shards(spec.data.uri, spec.data.format, options)
    assert names == ["00000.tar", "00001.tar"]
    fs, root = resolve(spec.data.uri, options)
    with fs.open_input_stream(f"{root}/{names[0]}") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        first = next(m for m in tar if m.name.endswith(".jpg"))
        pixels = decode_image(tar.extractfile(first).read(), spec.data.resolution, spec.data.channels, 8)
    assert pixels.shape == (3, spec.data.resolution, spec.data.resolution) and -1 <= pixels.min() <= pixels.max() <= 1
    assert isinstance(fs, pafs.S3FileSystem)


@pytest.mark.parametrize(
    ("overrides", "asha", "seeded"),
    [
        ([], True, True),
        (["sweep.scheduler=fifo"], False, True),
        (["sweep.scheduler=null", "sweep.seed=null"], False, False),  # documented: to the end; random
    ],
)
def test_the_sweep_section_reaches_tune_as_written(overrides, asha, seeded):
    """``sweep.scheduler: null`` runs every trial to the end and ``sweep.seed: null`` searches at random
    (a copy that dropped None once turned them into ASHA and seed 0)."""
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.sweep import tune_config

    spec = load_job(ROOT / "jobs" / "demo-sweep.yaml", overrides)
    config = tune_config(spec, spec.sweep)
    assert isinstance(config.scheduler, ASHAScheduler) if asha else config.scheduler is None
    assert spec.sweep.seed == (0 if seeded else None)
    assert (config.search_alg._random_state._rng is not None) == seeded



def test_each_section_is_declared_once_beside_its_code_and_the_workers_get_theirs_only():
    from workers.add.config import LossSpec
    from workers.data.config import DataSpec
    from workers.eval.config import EvalSpec
    from workers.train.config import TrainJob

    fields = JobSpec.model_fields
    assert issubclass(JobSpec, TrainJob)
    assert (fields["loss"].annotation, fields["data"].annotation, fields["eval"].annotation) == (
        LossSpec, DataSpec, EvalSpec,
    )  # fmt: skip
    spec = load_job(ROOT / "jobs" / "fashion-mnist.yaml")
    dump = spec.training_dump()
    assert set(dump) == set(TrainJob.model_fields) and not {"eval", "tracking", "promotion", "sweep"} & set(dump)
    assert TrainJob.model_validate(dump).model_dump() == {k: v for k, v in spec.model_dump().items() if k in dump}
