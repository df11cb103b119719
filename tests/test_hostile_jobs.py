"""Hostile job files: every one refused by ``addctl validate`` with exit 2 and the field's path, no
traceback, nothing created, no secret in the output, in bounded time, memory and output.

The corpus is ``tests/bad_jobs/*.yaml`` (each names what it must be refused for in a ``# expect:``
header, and a value it must never echo in ``# secret:``); inputs too large or too binary to commit
are made here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import MESSAGE_MAX, PROBLEMS_MAX, JobSpecError
from orchestrator.spec import MAX_JOB_BYTES, load_job

ROOT = Path(__file__).resolve().parents[1]
BAD_JOBS = sorted((ROOT / "tests" / "bad_jobs").glob("*.yaml"))
# Secrets in the environment of the validating process: a message must not hold them either.
AMBIENT = {"AWS_SECRET_ACCESS_KEY": "ambient-secret-Zq9wX7vT3", "HF_TOKEN": "hf_AmbientTokenValue0123456789abcdef"}
LINE_MAX = MESSAGE_MAX + 130  # "  path: message", the path cut at 120


def header(path: Path, key: str) -> str | None:
    match = re.search(rf"^# {key}: (.+)$", path.read_text(errors="replace"), re.M)
    return match.group(1).strip() if match else None


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """``addctl`` in an empty folder, its embedded home there too, secrets in its environment."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ADD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in AMBIENT.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def validate(runner: CliRunner, path: Path, *args: str):
    """``addctl validate`` on ``path``: the result, CPU seconds taken (the machine may be busy with
    other work: wall time would measure that) and peak bytes allocated (traced, which slows it ~3×)."""
    tracemalloc.start()
    started = time.process_time()
    try:
        result = runner.invoke(main, ["validate", str(path), *args])
    finally:
        seconds = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, seconds, peak


def assert_refused_cleanly(result, seconds: float, peak: int, expect: str, secrets: list[str]) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no exception escaped
    assert "Traceback" not in output
    assert expect in output, output
    for secret in secrets:
        assert secret not in output, f"echoed a secret: {output}"
    lines = output.strip().splitlines()
    assert len(lines) <= PROBLEMS_MAX + 2, f"{len(lines)} lines"
    assert all(len(line) <= LINE_MAX for line in lines), max(len(line) for line in lines)
    assert seconds < 5, f"took {seconds:.1f} CPU s"
    assert peak < 64 * 2**20, f"allocated {peak / 2**20:.0f} MiB"


def test_the_corpus_is_large_and_covers_every_class():
    assert len(BAD_JOBS) >= 60
    names = {p.stem for p in BAD_JOBS}
    for needed in (
        "flow_key_is_list",
        "deep_brackets",
        "alias_bomb",
        "nan_lr",
        "negative_seed",
        "empty_data_uri",
        "missing_absolute_teacher",
        "scheme_s4",
        "env_ref_unclosed",
        "shell_ref_env",
        "azure_connection_string",
        "token_in_url_user",
        "sweep_choice_password",
        "misindented_secret_steps",
    ):
        assert needed in names
    assert sum(1 for p in BAD_JOBS if header(p, "secret")) >= 15


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_validate_refuses_each_hostile_job_cleanly(path, runner, tmp_path):
    expect = header(path, "expect")
    assert expect, f"{path.name} has no '# expect:' header"
    result, seconds, peak = validate(runner, path)
    secrets = [s for s in [header(path, "secret"), *AMBIENT.values()] if s]
    assert_refused_cleanly(result, seconds, peak, expect, secrets)
    assert sorted(os.listdir(tmp_path)) == ["cwd"] and os.listdir(tmp_path / "cwd") == []  # nothing created


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


JOB = b"name: ok\nteacher:\n  source: runs/teacher\ndata:\n  uri: runs/data\n"


@pytest.mark.parametrize(
    "name, make, expect",
    [
        ("oversized", lambda: JOB + b"# padding\n" * (MAX_JOB_BYTES // 10 + 1), "(file): larger than"),
        ("not_utf8", lambda: JOB + b"train:\n  sample_prompts: [\"caf\xe9\"]\n", "(file): not UTF-8"),
        ("brackets_200kb", lambda: JOB + b"train:\n  sample_prompts: " + b"[" * 100_000 + b"]" * 100_000, "(yaml)"),
        ("braces_200kb", lambda: JOB + b"train: " + b"{a: " * 50_000 + b"1" + b"}" * 50_000, "(yaml)"),
        ("one_huge_line", lambda: JOB + b"train:\n  sample_prompts: [" + b"a, " * 300_000 + b"]\n", "(yaml)"),
        ("aliases_12_levels", lambda: _bomb(12), "(yaml)"),
    ],
)
def test_inputs_too_big_or_too_binary_to_commit(name, make, expect, runner, tmp_path):
    path = _write(tmp_path / "cwd", f"{name}.yaml", make())
    before = set(os.listdir(tmp_path / "cwd"))
    result, seconds, peak = validate(runner, path)
    assert_refused_cleanly(result, seconds, peak, expect, list(AMBIENT.values()))
    assert set(os.listdir(tmp_path / "cwd")) == before


def _bomb(levels: int) -> bytes:
    lines = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return JOB + b"x:\n" + "".join(f"  {line}\n" for line in lines).encode() + f"y: *a{levels}\n".encode()


def test_a_device_file_is_read_no_further_than_the_size_limit(runner):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    result, seconds, peak = validate(runner, Path("/dev/zero"))
    assert_refused_cleanly(result, seconds, peak, "(file): larger than", [])


@pytest.mark.parametrize(
    "override, expect",
    [
        ("train.lr_student=.nan", "train.lr_student"),
        ("train.seed=-3", "train.seed"),
        ("train.sample_prompts=" + "[" * 5000 + "]" * 5000, "train.sample_prompts"),
        ("env.HF_HOME=${HOME}/x", "env.HF_HOME"),
        ("tracking.uri=http://u:hunter2hunter2@h", "tracking.uri"),
        ("data.uri=s4://b/x", "data.uri"),
    ],
)
def test_hostile_overrides_are_refused_the_same_way(override, expect, runner):
    job = ROOT / "jobs" / "demo.yaml"
    result, seconds, peak = validate(runner, job, "--set", override)
    assert_refused_cleanly(result, seconds, peak, expect, ["hunter2hunter2", *AMBIENT.values()])


def test_a_secret_in_the_environment_is_masked_in_any_message(monkeypatch, tmp_path):
    """A job that names a secret's value (here as a prompt with a bad type) never shows it back."""
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "plain-looking-value-42")
    path = tmp_path / "job.yaml"
    path.write_text(JOB.decode() + "train:\n  steps: plain-looking-value-42\n")
    with pytest.raises(JobSpecError) as err:
        load_job(path)
    assert "plain-looking-value-42" not in str(err.value) and "train.steps" in str(err.value)


# Runs a command and reports its peak RSS: from a small process, since a child forked from pytest
# would count pytest's own pages in its ru_maxrss until it execs.
MEASURE = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(done.returncode)"
)


@pytest.mark.parametrize("name", ["alias_bomb", "deep_brackets", "huge_integer"])
def test_the_real_command_refuses_within_bounded_time_and_memory(name, tmp_path):
    """The CLI as a new process (no test harness catching anything), with its own peak memory."""
    path = ROOT / "tests" / "bad_jobs" / f"{name}.yaml"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "orchestrator.cli", "validate", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ADD_HOME": str(tmp_path / "home")},
    )
    seconds = time.perf_counter() - started
    text = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in text and "(yaml)" in text, text
    assert seconds < 30
    peak_kib = int(re.search(r"MAXRSS_KIB (\d+)", text)[1])
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert not (tmp_path / "home").exists()
