"""``addctl``: the command line of the ADD service. Thin: parse, call the orchestrator, print, exit.

Exit codes: 0 done; 1 failed (a job that failed, a cluster or server that refused or could not be
reached, a promotion refused); 2 bad input (an invalid job file or override, a bad flag, an
unknown model or job); 128 + N when a job run in the foreground was stopped by signal N.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import click

from orchestrator.errors import JobSpecError
from workers.data.fashion_mnist import FASHION_MNIST_IDX

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


class BadInput(click.ClickException):
    """Input the user must fix: exit code 2. The message passes the redactor (``workers.secrets``)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(_redact(message))


class Failed(click.ClickException):
    """Something outside the input failed: exit code 1. The message passes the redactor."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(_redact(message))


def _load(job: str, overrides: tuple[str, ...], check_paths: bool = True):
    from orchestrator.spec import load_job

    try:
        return load_job(job, overrides, check_paths=check_paths)
    except JobSpecError as err:
        raise BadInput(str(err)) from None


def _jobs_client(address: str | None):
    from orchestrator.jobs import JobsClient

    return JobsClient(address)


@contextmanager
def _ray_errors():
    """Cluster errors as exit 1 with their message (which never holds a token); unknown jobs as exit 2."""
    from orchestrator.jobs import RayJobsError

    try:
        yield
    except RayJobsError as err:
        text = str(err)
        if "does not exist" in text or "404" in text:
            raise BadInput(text) from None
        raise Failed(text) from None


@contextmanager
def _spinner(label: str, enabled: bool = True):
    """A progress line with the elapsed time for work whose length is not known in advance."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from tqdm.auto import tqdm

    done = threading.Event()
    bar = tqdm(desc=label, total=None, bar_format="{desc} {elapsed}", file=sys.stderr)

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _redact(text: str) -> str:
    from workers.secrets import redact

    return redact(text)


# ---- the group ------------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
def main():
    """Distil diffusion models with Adversarial Diffusion Distillation on Ray, tracked in MLflow.

    \b
    Examples:
      addctl validate jobs/demo.yaml
      addctl run jobs/demo.yaml --set train.steps=20            # embedded: local Ray, MLflow in ./runs
      addctl stack up && source runs/stack/env.sh               # Ray head, MLflow server, S3 on 127.0.0.1
      addctl submit jobs/demo.yaml --follow                     # to the Ray cluster at RAY_API_SERVER_ADDRESS
      addctl models show demo && addctl promote demo 1
      addctl generate models:/demo@champion -p "a sneaker" -o grid.png

    Exit codes: 0 done, 1 failed, 2 bad input, 128+N stopped by signal N.
    """


# ---- the job file ---------------------------------------------------------------------------------


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--print", "show", is_flag=True, help="print the resolved job (defaults filled in) as YAML")
def validate(job, overrides, show):
    """Check a job file: types, ranges, unknown keys, secrets, sweep paths. Exit 2 if invalid.

    \b
    Examples:
      addctl validate jobs/demo.yaml
      addctl validate jobs/sd15-laion.yaml --set resources.num_workers=4 --print
    """
    from orchestrator.spec import dump_job

    spec = _load(job, overrides)
    if show:
        click.echo(dump_job(spec), nl=False)
        return
    r = spec.resources
    sweep = f", sweep over {', '.join(spec.sweep.search_space)}" if spec.sweep else ""
    click.echo(
        f"{job}: valid job {spec.name!r}: teacher {spec.teacher.source}, {spec.train.steps} steps of "
        f"{spec.train.batch_size} on {r.num_workers} worker(s) × {r.gpus_per_worker:g} GPU{sweep}"
    )


@main.command()
@click.option(
    "--format", "fmt", type=click.Choice(["json", "markdown"]), default="json", help="JSON Schema or Markdown"
)
def schema(fmt):
    """Print the job file's JSON Schema (for editors) or its Markdown reference.

    \b
    Examples:
      addctl schema > job.schema.json     # e.g. "# yaml-language-server: $schema=job.schema.json"
      addctl schema --format markdown     # docs/job-reference.md
    """
    from orchestrator.reference import job_schema, reference_markdown

    click.echo(json.dumps(job_schema(), indent=2) if fmt == "json" else reference_markdown(), nl=fmt == "json")


@main.command()
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/job-reference.md"),
              help="the file whose job-reference section (between its markers) is regenerated")
@click.option("--check", is_flag=True, help="only check that the section is current (exit 1 if not)")
def docs(path, check):
    """Regenerate the job-file reference (generated from the job spec, one row per field) in place.

    \b
    Examples:
      addctl docs                 # after changing a field of the job spec
      addctl docs --check         # what CI runs: exit 1 when the reference is stale
    """
    from orchestrator.reference import readme_section, reference_markdown, write_readme

    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    section = readme_section(path.read_text())
    if section is None:
        raise BadInput(f"{path} has no job-reference markers")
    if check:
        if section != reference_markdown():
            raise Failed(f"{path}: the job-file reference is stale; run: addctl docs --file {path}")
        click.echo(f"{path}: the job-file reference is current")
        return
    write_readme(path)
    click.echo(f"{path}: job-file reference written")


# ---- running a job --------------------------------------------------------------------------------


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
@click.option("--tracking-uri", default=None, help="MLflow (default: tracking.uri, MLFLOW_TRACKING_URI, ./runs)")
@click.option("--storage", "storage_path", default=None, help="checkpoints and exports (default: storage.uri)")
@click.option("--run-name", default=None, help="name of the MLflow parent run (default: the job's name)")
@click.option("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: max(8, cores))")
@click.option("-v", "--verbose", is_flag=True, help="show the run's log here too (Ray, workers, libraries)")
def run(job, overrides, address, tracking_uri, storage_path, run_name, num_cpus, verbose):
    """Run a job in the foreground: train (or sweep), evaluate, register the student as `candidate`.

    On the embedded default (a local Ray, MLflow in ./runs/mlflow.db, checkpoints in ./runs)
    unless the job or the flags point elsewhere. Ctrl-C (or SIGTERM) ends the MLflow runs as KILLED.

    The console shows a progress bar per phase (training with its losses, each evaluated sampler
    row), the results table and where the runs are; what Ray, its workers and the libraries print
    goes to the run's log file (runs/<job name>/run.log on the embedded default), named first.

    \b
    Examples:
      addctl run jobs/demo.yaml
      addctl run jobs/demo.yaml --set train.steps=50 --set loss.lambda_adv=0
      addctl run jobs/demo.yaml -v                                # the log on the console as well
      addctl run jobs/sd15-laion.yaml --address auto --tracking-uri http://mlflow:5000
    """
    from orchestrator import embedded
    from orchestrator.console import Console, TrainingProgress, log_path
    from workers.secrets import SecretError, apply_env

    spec = _load(job, overrides)
    try:
        apply_env(spec.env)  # here is where the job runs: references resolve from this environment
    except SecretError as err:
        raise BadInput(str(err)) from None
    _check_data(spec)
    uri = embedded.tracking_uri(tracking_uri, spec.tracking.uri)
    from orchestrator.controller import run_job
    from orchestrator.tracking import JobStopped, ensure_experiment

    r = spec.resources
    trials = (spec.sweep.max_concurrent_trials or 1) if spec.sweep else 1
    needed = math.ceil(trials * (r.num_workers * r.cpus_per_worker + r.data_cpus + 1))
    cpus = num_cpus or max(8, os.cpu_count() or 1, needed)  # logical CPUs: more than cores is fine, fewer hangs
    log = log_path(storage_path or spec.storage.uri, spec.name, embedded.home())
    with Console(log, verbose) as console:
        console.say(
            f"job {spec.name}: the log of Ray, its workers and the libraries is {log}"
            + ("" if verbose else " (-v shows it here)")
        )
        ensure_experiment(uri, spec.tracking.experiment)
        os.environ["MLFLOW_TRACKING_URI"] = uri  # MLflow's fluent calls (model logging) go where the runs go
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
        import ray

        ours = not ray.is_initialized()
        console.say(f"Ray: {embedded.init_ray(address, cpus)}; MLflow: {_redact(uri)}")
        progress = TrainingProgress(uri, console.err)
        try:
            result = run_job(
                spec, tracking_uri=uri, storage_path=storage_path, run_name=run_name, on_phase=progress.on_phase
            )
        except JobStopped as stopped:
            console.say(f"job {spec.name} {stopped}")
            sys.exit(128 + stopped.signum)
        except KeyboardInterrupt:
            console.say(f"job {spec.name} interrupted")
            sys.exit(130)
        except Exception as err:  # noqa: BLE001  (the controller has recorded it on the runs)
            raise Failed(f"job {spec.name} failed: {_redact(f'{type(err).__name__}: {err}')} (log: {log})") from None
        finally:
            progress.stop()
            if ours:
                ray.shutdown()  # here, so that what Ray prints as it stops goes to the log
        _report(console, spec, uri, result, log, verbose)


def _check_data(spec) -> None:
    """Synthetic data made by a teacher (the job's) for a job in synthetic mode: exit 2 before anything starts."""
    from orchestrator.controller import data_provenance
    from workers.data import StorageError
    from workers.data.synthetic import SyntheticDataError

    try:
        data_provenance(spec.localized(), warn=lambda message: click.echo(f"warning: {message}", err=True))
    except SyntheticDataError as err:
        raise BadInput(str(err)) from None
    except StorageError as err:
        raise Failed(str(err)) from None


def _report(console, spec, uri: str, result, log: Path, verbose: bool) -> None:
    """The end of ``addctl run``: the table, what was registered, where the runs are, what to look at."""
    from mlflow.tracking import MlflowClient

    from orchestrator.console import where

    summary = _redact(json.dumps({k: v for k, v in vars(result).items()}, indent=2, default=str))
    console.log(summary + "\n")
    if verbose:
        console.say(summary, err=False)
    table = spec.eval.table
    if table is not None and table.results_dir and Path(table.results_dir, "table.md").is_file():
        console.say(f"\n{Path(table.results_dir, 'table.md').read_text()}(also in {table.results_dir}/)", err=False)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_run(result.parent_run_id).info.experiment_id
        best = client.get_run(result.best_run_id).data.tags if result.best_run_id else {}
    except Exception:  # noqa: BLE001  (a stub result, or a store gone meanwhile)
        experiment, best = None, {}
    if result.trials:
        console.say(f"sweep: {result.trials} trials, {len(result.failed_trials)} failed; best run {result.best_run_id}")
    if result.model_version:
        console.say(
            f"registered {result.model_name} version {result.model_version} as candidate: "
            f"addctl models show {result.model_name}"
        )
    if best.get("eval.error"):
        console.say(f"evaluation failed: {_redact(best['eval.error'])}", fg="yellow", bold=True)
    if lost := (result.data or {}).get("lost_rows_by_shard"):
        console.say(f"data: rows lost in {len(lost)} shard(s): {lost}", fg="yellow")
    console.say(f"runs: {_redact(where(uri, experiment, result.parent_run_id))}")
    console.say(f"log: {log}")
    if result.balance:
        console.say(f"balance at the last report, {result.balance}")
    for warning in result.warnings:
        console.say(f"WARNING: {warning}", fg="yellow", bold=True)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, 127.0.0.1:8265)")
@click.option("--tracking-uri", default=None, help="MLflow URI for the job (default: tracking.uri, then see below)")
@click.option("--storage", "storage_path", default=None, help="checkpoints and exports (default: storage.uri)")
@click.option("--follow", is_flag=True, help="stream the job's log until it ends; exit with its outcome")
@click.option("--wait", is_flag=True, help="wait until the job ends (a status line); exit with its outcome")
def submit(job, overrides, address, tracking_uri, storage_path, follow, wait):
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the submission id.

    The validated job (secrets still ${env:NAME} references) and this checkout's code travel as the
    job's runtime environment; the job's env references are expanded by Ray on the workers from
    the cluster's own environment. Without --tracking-uri or tracking.uri the job tracks to
    MLFLOW_TRACKING_URI when set here, else (a cluster on this machine) to ./runs/mlflow.db.
    The token is looked for in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    \b
    Examples:
      addctl submit jobs/demo.yaml --address http://127.0.0.1:8265 --follow
      addctl submit jobs/sdxl-laion.yaml --address https://ray.example.com --set train.steps=20000
    """
    from orchestrator import embedded
    from orchestrator.jobs import is_loopback, resolve_address

    address = resolve_address(address)
    local = is_loopback(address)
    spec = _load(job, overrides, check_paths=local)  # a remote cluster checks its own paths when it loads the job
    if local:
        spec = spec.localized()
    else:
        for field, uri in (("data.uri", spec.data.uri), ("storage.uri", spec.storage.uri)):
            if "://" not in uri:
                click.echo(f"warning: {field} {uri!r} is a path: the cluster reads it on its own disks", err=True)
    run_args, env = [], {}
    uri = tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and local:
        uri = embedded.embedded_tracking_uri()
        env[embedded.HOME_ENV] = str(embedded.home())
    if uri and not spec.tracking.uri:
        from orchestrator.jobs import check_tracking_uri

        try:
            run_args += ["--tracking-uri", check_tracking_uri(uri)]
        except ValueError as err:
            raise BadInput(str(err)) from None
    if storage_path:
        run_args += ["--storage", storage_path]
    client = _jobs_client(address)
    with _ray_errors():
        job_id = client.submit(spec, run_args=run_args, extra_env=env)
    click.echo(job_id)
    shown = _redact(address)
    click.echo(f"submitted to {shown}: addctl status {job_id} | logs {job_id} --follow | stop {job_id}", err=True)
    if follow or wait:
        with _ray_errors():
            if follow:
                for chunk in client.follow(job_id):
                    click.echo(chunk, nl=False)
            info = _wait_for(client, job_id, show=not follow)
        click.echo(f"job {job_id}: {info.status} {info.message}".rstrip(), err=True)
        sys.exit(0 if info.status == "SUCCEEDED" else 1)


def _wait_for(client, job_id: str, show: bool = True, timeout_s: float | None = None):
    if not show or not sys.stderr.isatty():
        return client.wait(job_id, timeout_s=timeout_s)
    from tqdm.auto import tqdm

    with tqdm(desc=job_id, total=None, bar_format="{desc}: {postfix} {elapsed}", file=sys.stderr) as bar:
        return client.wait(job_id, timeout_s=timeout_s, on_status=lambda i: bar.set_postfix_str(i.status))


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, 127.0.0.1:8265)")
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
def status(job_id, address, as_json):
    """Show a submitted job's status.

    \b
    Example:
      addctl status add-demo-1a2b3c4d
    """
    with _ray_errors():
        info = _jobs_client(address).info(job_id)
    if as_json:
        click.echo(_redact(json.dumps(vars(info), indent=2)))
        return
    click.echo(f"{info.submission_id}: {info.status}")
    for label, value in (("job", info.job_name), ("message", info.message), ("entrypoint", info.entrypoint)):
        if value:
            click.echo(f"  {label}: {_redact(value)}")  # a job submitted by other means may hold anything
    for label, value in (("started", info.start_time), ("ended", info.end_time)):
        if value:
            click.echo(f"  {label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value))}")


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, 127.0.0.1:8265)")
@click.option("--follow", "-f", is_flag=True, help="keep streaming until the job ends")
def logs(job_id, address, follow):
    """Print a submitted job's log (the driver's output).

    \b
    Examples:
      addctl logs add-demo-1a2b3c4d
      addctl logs add-demo-1a2b3c4d --follow
    """
    client = _jobs_client(address)
    with _ray_errors():
        if follow:
            for chunk in client.follow(job_id):
                click.echo(chunk, nl=False)
        else:
            click.echo(client.logs(job_id), nl=False)


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, 127.0.0.1:8265)")
@click.option("--wait/--no-wait", default=True, help="wait until the job has stopped")
@click.option("--timeout", type=float, default=60, help="seconds to wait")
@click.option("--tracking-uri", default=None, help="also end the job's MLflow runs still RUNNING as KILLED there")
def stop(job_id, address, wait, timeout, tracking_uri):
    """Stop a submitted job (SIGTERM to its driver, which ends its MLflow runs as KILLED).

    \b
    Example:
      addctl stop add-demo-1a2b3c4d
    """
    client = _jobs_client(address)
    with _ray_errors():
        client.info(job_id)
        asked = client.stop(job_id)
        info = _wait_for(client, job_id, timeout_s=timeout) if wait else client.info(job_id)
    if tracking_uri:  # runs whose driver was SIGKILLed before it could end them
        from orchestrator.tracking import mark_stopped

        ended = mark_stopped(tracking_uri, submission_id=job_id)
        if ended:
            click.echo(f"ended {len(ended)} MLflow run(s) still running as KILLED", err=True)
    state = "stop requested" if asked else "was not running"
    click.echo(f"{job_id}: {state}; now {info.status}")
    if wait and info.status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise Failed(f"{job_id} still {info.status} after {timeout:g} s")


@main.command(name="list")
@click.option("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, 127.0.0.1:8265)")
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
def list_jobs(address, as_json):
    """List the cluster's jobs, oldest first.

    \b
    Example:
      addctl list --address http://127.0.0.1:8265
    """
    with _ray_errors():
        jobs = _jobs_client(address).list()
    if as_json:
        click.echo(_redact(json.dumps([vars(j) for j in jobs], indent=2)))
        return
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.start_time)) if j.start_time else "-"
        click.echo(f"{j.submission_id:40} {j.status:10} {started:16} {j.job_name or _redact(j.entrypoint)[:40]}")


# ---- the registry ---------------------------------------------------------------------------------


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from orchestrator import embedded

    uri = embedded.tracking_uri(tracking_uri)
    if uri == embedded.embedded_tracking_uri() and not (embedded.home() / "mlflow.db").exists():
        raise BadInput(f"no MLflow store at {uri}: run a job first, or give --tracking-uri / MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


TRACKING = click.option(
    "--tracking-uri", default=None, help="MLflow (default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db)"
)


@main.group()
def models():
    """Registered students: their versions, aliases (candidate, champion) and evaluations."""


@models.command(name="list")
@TRACKING
def models_list(tracking_uri):
    """List registered models with their aliases.

    \b
    Example:
      addctl models list
    """
    from orchestrator.registry import LOCK_SUFFIX

    client, _ = _client(tracking_uri)
    for model in client.search_registered_models(max_results=1000):
        if model.name.endswith(LOCK_SUFFIX):
            continue
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items())) or "no aliases"
        latest = max((int(v.version) for v in model.latest_versions or []), default=0)
        click.echo(f"{model.name:30} latest v{latest}  {aliases}")


@models.command(name="show")
@click.argument("name")
@click.argument("version", required=False)
@TRACKING
def models_show(name, version, tracking_uri):
    """Show a model's versions (or one version with its evaluation and gate tags).

    \b
    Examples:
      addctl models show demo
      addctl models show demo 3
    """
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
        by_version = {}
        for alias, v in model.aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        if version is None:
            for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
                aliases = ",".join(by_version.get(str(mv.version), []))
                fid = mv.tags.get("eval/student_fid", "-")
                click.echo(f"v{mv.version:<4} {mv.status:8} run {mv.run_id}  fid {fid:>8}  {aliases}")
            return
        mv = client.get_model_version(name, version)
    except MlflowException as err:
        raise BadInput(f"{name}{f' v{version}' if version else ''}: {err.message}") from None
    click.echo(f"{name} v{mv.version} ({', '.join(by_version.get(str(mv.version), [])) or 'no alias'})")
    click.echo(f"  source: {mv.source}\n  run: {mv.run_id}")
    for key in sorted(mv.tags):
        click.echo(f"  {key}: {mv.tags[key]}")


@main.command()
@click.argument("name")
@click.argument("version")
@click.option("--force", is_flag=True, help="promote even if a gate fails (needs --reason)")
@click.option("--reason", default=None, help="why, recorded on the version (required with --force)")
@TRACKING
def promote(name, version, force, reason, tracking_uri):
    """Move the alias `champion` to VERSION if its evaluation passes the job's gates.

    \b
    Examples:
      addctl promote demo 3
      addctl promote demo 3 --force --reason "FID gate off by 0.2, approved by the team"
    """
    from mlflow.exceptions import MlflowException

    from orchestrator.promotion import PromotionRefused
    from orchestrator.promotion import promote as do_promote

    if force and not (reason or "").strip():
        raise BadInput("--force needs --reason: it is recorded on the version")
    client, _ = _client(tracking_uri)
    try:
        done = do_promote(name, version, force=force, reason=reason, client=client)
    except PromotionRefused as err:
        raise Failed(str(err)) from None
    except MlflowException as err:
        raise BadInput(f"{name} v{version}: {err.message}") from None
    for gate in done.gates:
        click.echo(f"  {gate.name}: {gate.outcome} ({gate.detail})")
    replaced = f" (was v{done.previous})" if done.previous else ""
    click.echo(f"{name} v{done.version} is champion{replaced}{' [forced]' if done.forced else ''}")


@main.command()
@click.argument("model")
@click.option("--prompt", "-p", "prompts", multiple=True, help="a prompt (repeatable)")
@click.option("--prompts-file", type=click.File(), default=None, help="one prompt per line")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="grid.png", help="the PNG grid to write")
@click.option("--steps", type=click.IntRange(1, 1000), default=1, help="student sampling steps")
@click.option("--seed", type=int, default=0, help="noise seed")
@click.option("--columns", type=click.IntRange(1), default=None, help="grid columns (default: square-ish)")
@TRACKING
def generate(model, prompts, prompts_file, out, steps, seed, columns, tracking_uri):
    """Sample one image per prompt with a student and write a PNG grid.

    MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS, a run id, or runs:/RUN_ID/student.

    \b
    Examples:
      addctl generate models:/demo@champion -p "a sneaker" -p "a bag" -o grid.png
      addctl generate demo@candidate --prompts-file prompts.txt --steps 4
    """
    from orchestrator.generate import generate as do_generate

    prompts = list(prompts) + ([line.strip() for line in prompts_file if line.strip()] if prompts_file else [])
    if not prompts:
        raise BadInput("give at least one prompt (--prompt or --prompts-file)")
    _, uri = _client(tracking_uri)
    try:
        with _spinner(f"sampling {len(prompts)} image(s)"):
            path = do_generate(model, prompts, out, steps=steps, seed=seed, columns=columns, tracking_uri=uri)
    except ValueError as err:
        raise BadInput(str(err)) from None
    except Exception as err:  # noqa: BLE001  (MLflow: unknown model, alias or run)
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
            raise BadInput(f"{model}: {err}") from None
        raise Failed(f"{model}: {type(err).__name__}: {err}") from None
    click.echo(str(path))


def _interrupt(*_):
    raise KeyboardInterrupt


def _serve_option(name: str, *flags: str, **kwargs):
    """A ``serve`` option whose default and help are ``ServeOptions``' own (declared once)."""
    from orchestrator.serve_options import ServeOptions

    field = ServeOptions.model_fields[name]
    return click.option(*flags, name, default=field.default, help=field.description, **kwargs)


@main.command()
@click.argument("model")
@_serve_option("replicas", "--replicas", type=click.IntRange(1))
@_serve_option("num_cpus", "--num-cpus", type=click.FloatRange(0, min_open=True))
@_serve_option("num_gpus", "--num-gpus", type=click.FloatRange(0))
@_serve_option("batching", "--batching/--no-batching")
@_serve_option("max_batch_size", "--max-batch-size", type=click.IntRange(1))
@_serve_option("batch_wait_s", "--batch-wait-s", type=click.FloatRange(0))
@_serve_option("poll_s", "--poll-s", type=click.FloatRange(0, min_open=True))
@_serve_option("max_prompt_chars", "--max-prompt-chars", type=click.IntRange(1))
@click.option("--host", default="127.0.0.1", help="address the HTTP proxy binds (0.0.0.0: every interface)")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="HTTP port")
@click.option("--address", default=None, help="deploy on this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
@click.option("--detach", is_flag=True, help="on a cluster: deploy, print the URL and exit; the application stays")
@TRACKING
def serve(model, host, port, address, detach, tracking_uri, **options):
    """Serve a student over HTTP on Ray Serve; a models:/NAME@ALIAS reference follows the alias.

    MODEL: anything `generate` takes. With models:/NAME@ALIAS each replica checks the alias every
    --poll-s seconds and, when `addctl promote` moved it, loads the new version beside the old one
    and swaps between two batches: no request in flight fails. In the foreground until Ctrl-C.

    \b
    POST /generate  {"prompts": ["a sneaker"], "steps": 1, "seed": 0, "format": "png"|"json"}
    GET  /health    GET /model (version, alias, steps, teacher)

    \b
    Examples:
      addctl serve models:/fashion-mnist@champion
      addctl serve models:/fashion-mnist@champion --replicas 2 --max-batch-size 32 --batch-wait-s 0.02
      addctl serve models:/sdxl-add@champion --num-gpus 1 --address auto --detach   # on a cluster
      curl -s localhost:8000/generate -d '{"prompt": "a black sneaker", "seed": 1}' -o sneaker.png
    """
    import signal

    from mlflow.exceptions import MlflowException

    from orchestrator.serve import start, stop
    from orchestrator.serve_options import ServeOptions
    from orchestrator.served_model import ModelRef, NoSuchModel, resolve

    client, uri = _client(tracking_uri)
    try:
        ref = ModelRef.parse(model, client)
        version = resolve(ref, client)
    except (ValueError, NoSuchModel) as err:
        raise BadInput(str(err)) from None
    except MlflowException as err:
        raise BadInput(f"{model}: {err.message}") from None
    cluster = address or os.environ.get("RAY_ADDRESS")
    if detach and not cluster:
        raise BadInput("--detach needs a Ray cluster (--address or RAY_ADDRESS): a local Ray ends with this command")
    served = f"{ref.uri} (v{version})" if version else ref.uri
    try:
        with _spinner(f"deploying {served}"):
            url = start(ServeOptions(model=model, tracking_uri=uri, **options), host, port, cluster)
    except Exception as err:  # noqa: BLE001  (a replica that could not start: Serve's reason, first line)
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise Failed(f"{model}: the application did not start: {lines[-1] if lines else type(err).__name__}") from None
    follows = f", following the alias every {options['poll_s']:g} s" if ref.alias else ""
    click.echo(f"serving {served} at {url}{follows}")
    click.echo(f"  curl -s {url}/generate -d '{{\"prompt\": \"...\"}}' -o image.png   |   {url}/model", err=True)
    if detach:
        return
    for signum in (signal.SIGINT, signal.SIGTERM):  # `kill` stops the server as Ctrl-C does (even if a shell
        signal.signal(signum, _interrupt)  # started it in the background, with SIGINT ignored)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopping", err=True)
    finally:
        import ray

        stop()
        ray.shutdown()


@main.command(name="serve-bench")
@click.argument("model")
@click.option("--clients", default="1,8,32", help="concurrent clients per level, comma-separated")
@click.option("--requests", type=click.IntRange(1), default=128, help="one-prompt requests per level")
@click.option("--repeats", type=click.IntRange(1), default=20, help="timed one-process calls per batch size")
@_serve_option("num_cpus", "--num-cpus", type=click.FloatRange(0, min_open=True))
@_serve_option("num_gpus", "--num-gpus", type=click.FloatRange(0))
@click.option("--max-batch-size", type=click.IntRange(1), default=32, help="images per network call when batching")
@_serve_option("batch_wait_s", "--batch-wait-s", type=click.FloatRange(0))
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="HTTP port of the local Serve")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the rows as JSON here")
@TRACKING
def serve_bench(model, clients, requests, repeats, num_cpus, num_gpus, max_batch_size, batch_wait_s, port, out,
                tracking_uri):  # fmt: skip
    """Measure a served student on a local Ray: images/s and p50/p99 latency at each client count,
    batching on and off, against the same student called in one process on the same batch sizes.

    One replica with --num-cpus CPUs (its torch threads; the one-process calls use as many) and
    --num-gpus GPUs (> 0: the one-process calls run on CUDA too). A last row sends GET /health: the
    requests/s the HTTP path allows without a model call.

    \b
    Examples:
      addctl serve-bench models:/fashion-mnist@champion
      addctl serve-bench models:/fashion-mnist@champion --clients 1,8,32 --requests 256 --out bench.json
    """
    from orchestrator.serve_bench import bench, table, to_json, verdict
    from orchestrator.serve_options import ServeOptions
    from orchestrator.served_model import ModelRef, NoSuchModel, resolve

    try:
        levels = sorted({int(c) for c in clients.split(",")})
    except ValueError:
        raise BadInput(f"--clients: comma-separated integers, got {clients!r}") from None
    if not levels or levels[0] < 1:
        raise BadInput(f"--clients: each at least 1, got {clients!r}")
    client, uri = _client(tracking_uri)
    try:
        resolve(ModelRef.parse(model, client), client)
    except (ValueError, NoSuchModel) as err:
        raise BadInput(str(err)) from None
    options = ServeOptions(model=model, tracking_uri=uri, num_cpus=num_cpus, num_gpus=num_gpus,
                           max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)  # fmt: skip
    show = lambda row: click.echo(  # noqa: E731
        f"{row.mode:20} {row.clients:3} clients: {row.images_per_s:7.1f} images/s  p50 {row.p50_ms:7.1f} ms  "
        f"p99 {row.p99_ms:7.1f} ms", err=True
    )
    try:
        rows = bench(options, levels, requests, repeats, port, on_row=show)
    except Exception as err:  # noqa: BLE001  (a failed request, a replica that did not start)
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise Failed(f"{model}: {type(err).__name__}: {lines[-1] if lines else ''}") from None
    click.echo(table(rows))
    for line in verdict(rows):
        click.echo(line)
    if out:
        Path(out).write_text(to_json(rows))


# ---- data -----------------------------------------------------------------------------------------


@main.group(name="prepare-data")
def prepare_data():
    """Write image-caption Parquet shards (to a local folder or s3://bucket/prefix)."""


@prepare_data.command(name="fashion-mnist")
@click.argument("out")
@click.option("--idx-dir", default=FASHION_MNIST_IDX, help="folder of the Fashion-MNIST idx files")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", help="which split")
@click.option("--limit", type=click.IntRange(1), default=None, help="only the first N images")
@click.option("--rows-per-shard", type=click.IntRange(1), default=10000, help="rows per Parquet shard")
@click.option("--seed", type=int, default=0, help="seed of the caption draw")
def prepare_fashion_mnist(out, idx_dir, split, limit, rows_per_shard, seed):
    """Fashion-MNIST as captioned 32×32 PNG shards (held-out caption templates for the test split).

    \b
    Examples:
      addctl prepare-data fashion-mnist runs/data/fashion-mnist --limit 2048
      addctl prepare-data fashion-mnist s3://add/fashion-mnist-test --split test
    """
    from workers.data import StorageError
    from workers.data import prepare_fashion_mnist as prepare

    try:
        with _spinner(f"writing {split} shards to {out}"):
            manifest = prepare(idx_dir, out, split=split, limit=limit, rows_per_shard=rows_per_shard, seed=seed)
    except FileNotFoundError as err:
        raise BadInput(f"{idx_dir}: {err}") from None
    except StorageError as err:
        raise Failed(str(err)) from None
    click.echo(f"{out}: {manifest.get('rows')} rows in {len(manifest.get('shards', []))} shard(s)")


@prepare_data.command(name="folder")
@click.argument("folder")
@click.argument("out")
@click.option("--rows-per-shard", type=click.IntRange(1), default=5000, help="rows per Parquet shard")
@click.option("--seed", type=int, default=0, help="shuffle seed (images are mixed across shards)")
def prepare_folder(folder, out, rows_per_shard, seed):
    """A folder of captioned images (captions.csv/jsonl or .txt beside each image) as shards.

    \b
    Example:
      addctl prepare-data folder ~/photos s3://add/photos --rows-per-shard 1000
    """
    from workers.data import StorageError, prepare_image_folder

    try:
        with _spinner(f"writing shards to {out}"):
            manifest = prepare_image_folder(folder, out, rows_per_shard=rows_per_shard, seed=seed)
    except FileNotFoundError as err:
        raise BadInput(f"{folder}: {err}") from None
    except StorageError as err:
        raise Failed(str(err)) from None
    click.echo(f"{out}: {manifest.get('rows')} rows in {len(manifest.get('shards', []))} shard(s)")


def _synthesis_option(name: str, *flags: str, **kwargs):
    """A ``prepare-data synthetic`` option whose default is ``SynthesisConfig``'s own (declared once)."""
    from workers.data.synthetic import SynthesisConfig

    return click.option(*flags, name, default=SynthesisConfig.__dataclass_fields__[name].default, **kwargs)


@prepare_data.command(name="synthetic")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="a UTF-8 text file of prompts, one per line, each once",
)
@click.option("--out", default=None, help="where the set goes (default: the job's data.uri)")
@_synthesis_option(
    "images_per_prompt",
    "--images-per-prompt",
    type=click.IntRange(1),
    help="images of each prompt, each with its own noise",
)
@_synthesis_option("solver", "--solver", help="the teacher's sampler (ddim, dpmpp: workers.add.sampler)")
@_synthesis_option("steps", "--steps", type=click.IntRange(1, 1000), help="sampler steps")
@_synthesis_option("guidance_scale", "--guidance-scale", type=click.FloatRange(1), help="classifier-free guidance")
@_synthesis_option("seed", "--seed", type=click.IntRange(0, 2**32 - 1), help="seed of the noise (per shard and batch)")
@_synthesis_option("batch_size", "--batch-size", type=click.IntRange(1), help="images per teacher call")
@_synthesis_option(
    "rows_per_shard",
    "--rows-per-shard",
    type=click.IntRange(1),
    help="images per shard: the unit of work, of progress and of resume",
)
@_synthesis_option(
    "precision",
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    help="the teacher's weights: auto is bf16 on GPU, fp32 on CPU",
)
@click.option("--max-prompt-chars", type=click.IntRange(1), default=1000, help="the longest prompt accepted")
@click.option("--actors", type=click.IntRange(1), default=None, help="teacher actors (default: one per GPU, else 1)")
@click.option("--overwrite", is_flag=True, help="replace a finished synthetic set there (a real set never is)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field of the job")
@click.option("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
@click.option("-v", "--verbose", is_flag=True, help="show the log here too (Ray, its actors, libraries)")
def prepare_synthetic(job, prompts_file, out, max_prompt_chars, actors, overwrite, overrides, address, verbose,
                      **sampler):  # fmt: skip
    """The teacher's own samples for a prompt set as a shard set (synthetic data, as LADD trains on):
    the job's teacher on Ray Data actors (a GPU each where the cluster has GPUs), written to the job's
    data.uri (or --out) with a manifest naming the teacher and its sampler. A job with data.mode:
    synthetic trains on it, and may set loss.lambda_distill: 0.

    The same prompts and settings give the same images. A run that stopped resumes when started again
    with the same settings; a finished set is replaced only with --overwrite.

    \b
    Examples:
      addctl prepare-data synthetic jobs/fashion-mnist.yaml --prompts prompts.txt --out runs/data/fm-synthetic
      addctl prepare-data synthetic ladd.yaml --prompts prompts.txt --images-per-prompt 4 --steps 25
      addctl prepare-data synthetic ladd.yaml --prompts prompts.txt --address auto     # on a GPU cluster
    """
    from orchestrator import embedded
    from orchestrator.spec import missing_paths
    from workers.data import StorageError
    from workers.data.storage import storage_options
    from workers.data.synthetic import PromptError, SynthesisConfig, SyntheticDataError, read_prompts, synthesize
    from workers.secrets import SecretError, apply_env

    spec = _load(job, overrides, check_paths=False).localized()  # data.uri is what this command makes
    for problem in missing_paths(spec):
        if problem.path == "teacher.source":
            raise BadInput(f"{job}: teacher.source: {problem.message}")
    if out is None and spec.data.mode != "synthetic":
        raise BadInput(
            f"{job}: data.mode is real, so data.uri holds a real set; set data.mode: synthetic to make the job's "
            "data, or give --out"
        )
    out = out or spec.data.uri
    try:
        apply_env(spec.env)
        options = storage_options(spec.data.storage_options, "data.storage_options")
        prompts = read_prompts(prompts_file, max_prompt_chars)
        config = SynthesisConfig(
            teacher=spec.teacher.source,
            prediction_type=spec.teacher.prediction_type,
            resolution=spec.teacher.resolution,
            **sampler,
        )
    except (SecretError, PromptError, ValueError) as err:
        raise BadInput(str(err)) from None
    import ray
    from tqdm.auto import tqdm

    from orchestrator.console import Console

    log = Path(embedded.home(), "logs", f"{spec.name}-synthetic.log")
    ours = not ray.is_initialized()
    with Console(log, verbose) as console:
        console.say(f"data job {spec.name}: the log of Ray, its actors and the libraries is {log}")
        console.say(f"Ray: {embedded.init_ray(address)}")
        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar: ours
        total = len(prompts) * config.images_per_prompt
        bar = tqdm(total=total, desc="teacher samples", unit="image", file=console.err,
                   disable=not console.err.isatty())  # fmt: skip
        try:
            manifest = synthesize(config, prompts, out, options=options, overwrite=overwrite, actors=actors,
                                  on_progress=lambda done, _: bar.update(done - bar.n))  # fmt: skip
        except SyntheticDataError as err:
            raise BadInput(str(err)) from None
        except StorageError as err:
            raise Failed(str(err)) from None
        except Exception as err:  # noqa: BLE001  (the teacher failed on an actor): shards made so far are kept
            raise Failed(f"{out}: the data job failed ({_redact(f'{type(err).__name__}: {err}')}); "
                         f"run it again with the same settings to resume (log: {log})") from None  # fmt: skip
        finally:
            bar.close()
            if ours:
                ray.shutdown()  # here, so that what Ray prints as it stops goes to the log
    made = manifest["synthetic"]
    click.echo(
        f"{out}: {manifest['rows']} images of {made['prompts']} prompts in {len(manifest['shards'])} shard(s), "
        f"by {config.teacher} ({config.solver}, {config.steps} steps, CFG {config.guidance_scale:g})"
    )


# ---- a teacher to distil --------------------------------------------------------------------------


@main.group()
def teacher():
    """The teacher to distil: train one, export it, measure its rows of the benchmark table."""


@teacher.command(name="train")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--tracking-uri", default=None, help="MLflow (default: tracking.uri, MLFLOW_TRACKING_URI, ./runs)")
def teacher_train(job, overrides, tracking_uri):
    """Train a caption-conditioned pixel teacher by plain diffusion from image-caption shards, in the
    foreground; log it to MLflow and export it as a diffusers folder.

    The job file is a teacher job (orchestrator/teacher_job.py), not an ADD job. Running it again with
    the same output.run folder resumes from its checkpoint (e.g. with a larger train.steps).

    \b
    Examples:
      addctl prepare-data fashion-mnist runs/data/fashion-mnist-train
      addctl teacher train jobs/fashion-mnist-teacher.yaml                  # resumable: run it again
      addctl teacher train jobs/fashion-mnist-teacher.yaml --set train.steps=20 --set output.run=runs/try
    """
    from orchestrator.teacher_job import load_teacher_job, run_teacher_job
    from orchestrator.tracking import JobStopped
    from workers.data import StorageError
    from workers.secrets import SecretError

    try:
        spec = load_teacher_job(job, overrides)
    except JobSpecError as err:
        raise BadInput(str(err)) from None
    try:
        result = run_teacher_job(spec, tracking_uri)
    except (JobSpecError, SecretError, FileNotFoundError) as err:  # the run folder, secrets, no shards
        raise BadInput(_redact(str(err))) from None
    except StorageError as err:
        raise Failed(str(err)) from None
    except JobStopped as stopped:
        click.echo(f"job {spec.name} {stopped}; run it again to resume from the last checkpoint", err=True)
        sys.exit(128 + stopped.signum)
    except KeyboardInterrupt:
        click.echo(f"job {spec.name} interrupted; run it again to resume from the last checkpoint", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001  (recorded as FAILED on the MLflow run)
        raise Failed(f"job {spec.name} failed: {_redact(f'{type(err).__name__}: {err}')}") from None
    click.echo(json.dumps(vars(result), indent=2))


@teacher.command(name="train-idx")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder (checkpoint.pt, history.json); the same folder resumes")
@click.option("--steps", type=click.IntRange(min=1), default=5000, help="total optimizer steps")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="images per step")
@click.option("--lr", type=float, default=5e-4, help="AdamW learning rate")
@click.option("--seed", type=int, default=0, help="seed of the weights and of every step's draws")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads")
@click.option("--idx-dir", default=FASHION_MNIST_IDX, help="folder of the Fashion-MNIST idx files")
def teacher_train_idx(out, steps, batch_size, lr, seed, threads, idx_dir):
    """Train the Fashion-MNIST teacher straight from the idx files (no job file, no MLflow), each draw
    pairing an image with a random training caption of its label; export it with `addctl teacher export`.

    \b
    Examples (two to three hours on 2 CPU cores; resumable, run it in the background):
      nohup addctl teacher train-idx --out runs/fashion-mnist-teacher --steps 5000 &
      addctl teacher export runs/fashion-mnist-teacher jobs/fashion-mnist/teacher
    """
    from workers.diffusion.train import train

    torch_threads(threads)
    click.echo(json.dumps(train(out, steps, batch_size, lr, seed=seed, idx_dir=idx_dir)))


@teacher.command(name="export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema",
              help="the EMA of the weights, or the trained weights themselves (short runs)")
def teacher_export(run, folder, weights):
    """Write a teacher run folder's weights as a diffusers folder (replaced atomically).

    \b
    Example:
      addctl teacher export runs/fashion-mnist-teacher jobs/fashion-mnist/teacher
    """
    from workers.diffusion.train import export

    click.echo(export(run, folder, weights))


@teacher.command(name="rows")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the rows (default: eval.table.teacher_rows)")
@click.option("--progress", type=click.Path(file_okay=False), default=None,
              help="folder of finished rows and batches (default: runs/teacher-rows/<job name>)")
@click.option("--retime", is_flag=True, help="only time the rows of the existing file again")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's)")
def teacher_rows(job, overrides, out, progress, retime, threads):
    """Measure the teacher's rows of a job's benchmark table (eval.table) once, to ship beside the teacher.

    The rows are keyed by the teacher's fingerprint and the table's protocol: a job whose teacher or
    protocol differs refuses them and names this command. Finished rows and batches are kept under
    --progress, so a killed measurement resumes (see orchestrator/teacher_rows.py).

    \b
    Examples:
      addctl teacher rows jobs/fashion-mnist.yaml --threads 2      # hours on a CPU; resumable
      addctl teacher rows jobs/fashion-mnist.yaml --retime         # only the speed columns again
    """
    from orchestrator.teacher_rows import measure_teacher_rows, retime_teacher_rows
    from workers.eval.progress import StaleProgress
    from workers.eval.table import StaleTeacherRows

    spec = _load(job, overrides)
    if threads:
        torch_threads(threads)
    try:
        path = retime_teacher_rows(spec, out) if retime else measure_teacher_rows(spec, out, progress)
    except (StaleTeacherRows, StaleProgress, ValueError) as err:  # rows or progress of another teacher or protocol
        raise BadInput(str(err)) from None
    click.echo(path.with_suffix(".md").read_text())
    click.echo(json.dumps({"written": str(path)}))


# ---- the evaluator network ------------------------------------------------------------------------


@main.group()
def evaluator():
    """The benchmark's evaluator network (features of FID and recall, class accuracy)."""


@evaluator.command(name="train")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for classifier.safetensors and classifier.json")
@click.option("--epochs", type=click.IntRange(min=1), default=4, help="epochs over the train split")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads")
@click.option("--idx-dir", default=FASHION_MNIST_IDX, help="folder of the Fashion-MNIST idx files")
def evaluator_train(out, epochs, threads, idx_dir):
    """Train the small Fashion-MNIST classifier whose penultimate layer is the table's feature space
    (workers/benchmark/classifier.py); it sees only the evaluation, never the discriminator.

    \b
    Example (a few minutes on 2 CPU cores):
      addctl evaluator train --out jobs/fashion-mnist/evaluator
    """
    from workers.benchmark.classifier import train

    torch_threads(threads)
    click.echo(json.dumps(train(out, epochs, idx_dir=idx_dir), indent=2))


@main.command(name="random-dinov2")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["small", "base"]), default="small", help="DINOv2 size to copy")
@click.option("--seed", type=int, default=0, help="seed of the random weights")
def random_dinov2(out, shape, seed):
    """Write a DINOv2 folder of a real model's shape with random weights (the ablation's control:
    how much of a DINOv2 discriminator is its pretraining).

    \b
    Example:
      addctl random-dinov2 runs/dinov2-small-shaped
    """
    from workers.add.random_dinov2 import save_dinov2_shaped

    click.echo(save_dinov2_shaped(out, shape, seed))


# ---- measurements and demonstrations --------------------------------------------------------------


@main.group()
def bench():
    """Throughput benchmarks: one ADD step in this process, distributed training on Ray."""


@bench.command(name="step")
@click.option("--teacher", required=True, help="diffusers folder or hub id of the teacher")
@click.option("--backbone", type=click.Choice(["teacher", "dinov2"]), default="teacher", help="discriminator F")
@click.option("--batch-size", type=click.IntRange(min=2), default=8, help="images per iteration")
@click.option("--image-size", type=click.IntRange(min=8), default=16, help="pixel resolution of the batch")
@click.option("--iters", type=click.IntRange(min=1), default=10, help="timed iterations")
@click.option("--warmup", type=click.IntRange(min=0), default=3, help="untimed iterations first")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's)")
def bench_step(teacher, backbone, batch_size, image_size, iters, warmup, threads):
    """Time one ADD iteration (student step and discriminator step) in this process, no Ray
    (workers/add/benchmark.py); prints seconds per iteration and images/s as JSON.

    \b
    Example:
      addctl bench step --teacher jobs/fashion-mnist/teacher --batch-size 32 --image-size 32 --threads 2
    """
    from workers.add.benchmark import run

    if threads:
        torch_threads(threads)
    click.echo(json.dumps(run(teacher, backbone, batch_size, iters, warmup, image_size), indent=2))


@bench.command(name="train")
@click.option("--images", type=click.IntRange(min=1), default=16384, help="Fashion-MNIST images written to S3")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=1024, help="rows per Parquet shard")
@click.option("--steps", type=click.IntRange(min=2), default=30, help="training steps per run")
@click.option("--log-every", type=click.IntRange(min=1), default=10, help="steps per report; the first is warm-up")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, help="global batch")
@click.option("--cpus", type=click.IntRange(min=1), default=8, help="logical CPUs given to Ray")
@click.option("--teacher", default=None, help="teacher folder (default: a random Fashion-MNIST teacher)")
@click.option("--idx-dir", default=FASHION_MNIST_IDX, help="folder of the Fashion-MNIST idx files")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the results as JSON here too")
def bench_train(images, rows_per_shard, steps, log_every, batch_size, cpus, teacher, idx_dir, out):
    """Throughput of distributed ADD training on Ray from an S3 server on loopback: ingest images/s,
    samples/s and data wait with 1 and 2 workers, FSDP memory per rank (workers/train/benchmark.py).

    \b
    Example (about 5 minutes on 2 CPU cores):
      addctl bench train --out results/train-benchmark.json
    """
    from workers.train.benchmark import run

    result = run(images=images, rows_per_shard=rows_per_shard, steps=steps, log_every=log_every,
                 batch_size=batch_size, cpus=cpus, teacher=teacher, idx_dir=idx_dir)  # fmt: skip
    text = json.dumps(result, indent=2)
    click.echo(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


@main.command()
@click.option("--steps", type=click.IntRange(min=1), default=600, help="ADD iterations")
@click.option("--seed", type=int, default=0, help="random seed")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/toy"),
              help="folder for samples.png")
@click.option("--schedule", type=click.Choice(["ddpm", "flow"]), default="ddpm", show_default=True,
              help="the teacher's path: DDPM (against its DDIM sampler) or rectified flow (against its Euler sampler)")
@click.option("--shift", type=click.FloatRange(min=0, min_open=True), default=None,
              help="the flow teacher's timestep shift (--schedule flow; default 1.0, SD3 uses 3.0)")
def toy(steps, seed, out, schedule, shift):
    """ADD on a 2-D toy in seconds (workers/add/toy.py): the student at 1 step against its teacher at 1
    and 50 steps, as sliced W1 to the data; writes a scatter plot of samples.

    \b
    Examples:
      addctl toy
      addctl toy --steps 600 --out results/toy
      addctl toy --schedule flow --out results/toy-flow
      addctl toy --schedule flow --shift 3.0
    """
    from workers.add.toy import plot, run_toy

    if shift is not None and schedule != "flow":
        raise click.UsageError("--shift is the flow teacher's timestep shift: it needs --schedule flow")
    run = run_toy(steps, seed=seed, schedule=schedule, flow_shift=shift)
    click.echo("| sampler | sliced W1 to data (lower is better) |\n|---|---|")
    for name, value in run["sliced_w1"].items():
        click.echo(f"| {name} | {value:.4f} |")
    plot(run, out / "samples.png", seed)
    click.echo(f"scatter plot: {out / 'samples.png'}")


@main.command(name="balance-probe")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field (repeatable)")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="ADD steps")
@click.option("--images", type=click.IntRange(min=100), default=1000, show_default=True, help="images per score")
@click.option("--label", default=None, help="the result's name (default: the overrides)")
@click.option("--out", type=click.Path(dir_okay=False), default="results/balance/probes.jsonl", show_default=True,
              help="JSON lines file the result is appended to")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch threads")
@click.option("--device", default="cpu", show_default=True, help="torch device the step runs on (e.g. cuda)")
@click.option("--frozen-student", is_flag=True,
              help="the control: only the heads learn, against the initial student (how fast can they learn?)")
@click.option("--freeze-student-at", "freeze_at", type=click.IntRange(min=0), default=None,
              help="the same control from step K on: the student of step K is frozen, the heads go on learning")
@click.option("--fresh-heads", is_flag=True,
              help="with --freeze-student-at: the heads restart there from their initial weights")
def balance_probe(job, overrides, steps, images, label, out, threads, device, frozen_student, freeze_at, fresh_heads):
    """Run a job's ADD step in this process (no Ray, no MLflow) for a few hundred steps and print how the
    two losses pull on θ and whether the heads learn, then the student's 1- and 4-step scores.

    A cheap way to compare balance settings (loss.balance, loss.adv_ratio, loss.weighting, ...) with each
    other before a full run; see orchestrator/balance_probe.py for what it does and does not measure.

    \b
    Examples:
      addctl balance-probe jobs/fashion-mnist.yaml --steps 200
      addctl balance-probe jobs/fashion-mnist.yaml --set loss.balance=adaptive --set loss.adv_ratio=0.3
      addctl balance-probe jobs/fashion-mnist.yaml --set discriminator.minibatch_std=8 --device cuda
      addctl balance-probe jobs/fashion-mnist.yaml --frozen-student --steps 50
      addctl balance-probe jobs/fashion-mnist.yaml --freeze-student-at 100 --fresh-heads --steps 180
    """
    from orchestrator.balance_probe import probe, write

    if frozen_student and freeze_at not in (None, 0):
        raise click.UsageError("--frozen-student freezes the initial student: leave out --freeze-student-at")
    if fresh_heads and freeze_at is None:
        raise click.UsageError("--fresh-heads restarts the heads where the student is frozen: add --freeze-student-at")
    freeze_at = 0 if frozen_student else freeze_at
    spec = _load(job, overrides)
    torch_threads(threads)
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    result = probe(spec, steps, images=images, log=log, device=device, freeze_at=freeze_at, fresh_heads=fresh_heads)
    control = [] if freeze_at is None else ["frozen student" + (f" from step {freeze_at}" if freeze_at else "")]
    control += ["fresh heads"] if fresh_heads else []
    name = label or " ".join([*overrides, *control]) or "the job as written"
    result = {"label": name, "job": job, "frozen_student": freeze_at == 0, "freeze_student_at": freeze_at,
              "fresh_heads": fresh_heads, **result}
    write(result, out)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "reports"}, indent=2))


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---- the local stack ------------------------------------------------------------------------------

STACK_DIR = click.option(
    "--dir", "folder", type=click.Path(file_okay=False), default="runs/stack", help="state and logs of the stack"
)


@main.group()
def stack():
    """The local stack on 127.0.0.1: a Ray head, an MLflow server, an S3 server (moto)."""


@stack.command(name="up")
@STACK_DIR
@click.option("--num-cpus", type=click.IntRange(1), default=None, help="Ray's logical CPUs (default: max(8, cores))")
@click.option("--object-store-mb", type=click.IntRange(64), default=None, help="Ray's object store size")
@click.option("--timeout", type=float, default=180, help="seconds to wait for the services to be healthy")
@click.option(
    "--pass-env",
    multiple=True,
    metavar="NAME",
    help="a variable of this shell the Ray head's jobs may read (a secret their ${env:NAME} refers to); repeatable",
)
def stack_up(folder, num_cpus, object_store_mb, timeout, pass_env):
    """Start the stack and wait until each service is healthy; prints the environment to use it.

    Each service gets only the variables it needs, never this shell's credentials; the Ray head's
    jobs use the stack's S3 with placeholder keys. Name with --pass-env the secrets jobs refer to.

    \b
    Examples:
      addctl stack up --dir runs/stack && source runs/stack/env.sh
      addctl stack up --pass-env HF_TOKEN      # jobs may use env: {HF_TOKEN: ${env:HF_TOKEN}}
    """
    from tqdm.auto import tqdm

    from orchestrator.stack import StackError, env_exports, up

    with tqdm(total=3, desc="starting", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:

        def ready(service):
            bar.set_postfix_str(f"{service.name} up")
            bar.update()

        try:
            state = up(
                Path(folder),
                num_cpus=num_cpus,
                object_store_mb=object_store_mb,
                timeout_s=timeout,
                on_ready=ready,
                pass_env=tuple(pass_env),
            )
        except StackError as err:
            raise Failed(str(err)) from None
    for name, value in env_exports(state).items():
        click.echo(f"export {name}={value}")
    click.echo(f"# stack up; these lines are in {Path(folder) / 'env.sh'}; stop with: addctl stack down", err=True)


@stack.command(name="down")
@STACK_DIR
def stack_down(folder):
    """Stop the stack's services (by their pids; other Ray clusters are left alone). State stays.

    \b
    Example:
      addctl stack down --dir runs/stack
    """
    from orchestrator.stack import StackError, down

    try:
        stopped = down(Path(folder))
    except StackError as err:
        raise BadInput(str(err)) from None
    click.echo(f"stopped: {', '.join(stopped)}")


@stack.command(name="status")
@STACK_DIR
def stack_status(folder):
    """Show each service of the stack: URL, pid, running, healthy.

    \b
    Example:
      addctl stack status
    """
    from orchestrator.stack import status as stack_state

    state = stack_state(Path(folder))
    if not state:
        raise BadInput(f"no stack in {folder}")
    for name, s in state.items():
        health = "healthy" if s["healthy"] else ("running" if s["running"] else "stopped")
        click.echo(f"{name:7} {health:8} {s['url']:28} pid {s['pid']}  log {s['log']}")
    if not all(s["healthy"] for s in state.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
