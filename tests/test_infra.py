"""infra/: every manifest parses, every entrypoint calls the CLI as it is today, no secret in clear;
and ``addctl stack up|down`` starts and stops a Ray head, an MLflow server and an S3 server on loopback."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import ray
import yaml
from click.testing import CliRunner

from orchestrator import stack
from orchestrator.cli import main
from orchestrator.spec import URI_PASSWORD, load_job

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFESTS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.I)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in documents(p) if isinstance(d, dict) and d.get("kind") == kind]


def check_addctl(command: str) -> list[str]:
    """Parse an ``addctl ...`` command line with the CLI's own parser (options, arguments, choices)."""
    args = shlex.split(command)
    assert args[0] == "addctl" or args[:3] == ["python", "-m", "orchestrator.cli"], command
    args = args[1:] if args[0] == "addctl" else args[3:]
    command, rest = main, list(args)
    while isinstance(command, click.Group):
        assert rest, f"{args}: a subcommand is missing"
        name, rest = rest[0], rest[1:]
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"addctl has no command {name!r} ({args})"
    command.make_context(name, rest)  # raises click.UsageError on an unknown option or a bad value
    return args


def test_there_are_manifests_and_they_all_parse():
    names = {str(p.relative_to(INFRA)) for p in MANIFESTS}
    assert {"k8s/raycluster.yaml", "k8s/mlflow.yaml", "k8s/rayservice.yaml", "serve/student.yaml"} <= names
    assert "cluster/aws-gpu.yaml" in names
    assert any(n.startswith("k8s/rayjob-") for n in names)
    for path in MANIFESTS:
        assert documents(path), path


def test_rayjobs_run_the_cli_on_a_valid_job_without_secrets():
    jobs = by_kind("RayJob")
    assert len(jobs) >= 2
    for path, job in jobs:
        spec = job["spec"]
        args = check_addctl(spec["entrypoint"])
        assert args[0] == "run"
        job_file = next(a for a in args if a.endswith(".yaml"))
        assert load_job(ROOT / job_file).resources.gpus_per_worker > 0, f"{path}: {job_file}"
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        for name, value in runtime_env.get("env_vars", {}).items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", value), f"{path}: {name} must be a ${{NAME}} expansion"
        assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
        check_cluster(path, spec["rayClusterSpec"])


def check_cluster(path: Path, spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{path}: rayVersion"
    assert spec["authOptions"]["mode"] == "token", f"{path}: token authentication"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus == 8, f"{path}: the recipes need 8 GPUs"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                assert not (SECRET_NAME.search(var["name"]) and "value" in var), f"{path}: {var['name']} in clear"


def test_raycluster_for_submissions():
    clusters = by_kind("RayCluster")
    assert clusters
    for path, cluster in clusters:
        check_cluster(path, cluster["spec"])
        for line in path.read_text().splitlines():
            if "addctl " in line and line.lstrip().startswith("#   addctl"):
                check_addctl(line.split("#", 1)[1].strip())


def test_mlflow_with_postgres_and_s3():
    from mlflow.cli import cli as mlflow_cli

    deployments = {d["metadata"]["name"]: d for _, d in by_kind("Deployment")}
    container = deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"]
    mlflow_cli.commands["server"].make_context("server", command[2:])  # the flags exist in this MLflow
    options = dict(zip(command[2::2], command[3::2], strict=False))
    store, artifacts = options["--backend-store-uri"], options["--artifacts-destination"]
    assert store.startswith("postgresql://") and not URI_PASSWORD.match(store)  # PGPASSWORD from a Secret
    assert artifacts.startswith("s3://")
    env = {e["name"]: e for e in container["env"]}
    for name in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    assert {d["metadata"]["name"] for _, d in by_kind("StatefulSet")} >= {"postgres"}
    services = {d["metadata"]["name"]: d for _, d in by_kind("Service")}
    assert services["mlflow"]["spec"]["ports"][0]["port"] == 5000


def test_cluster_launcher_config():
    config = documents(INFRA / "cluster" / "aws-gpu.yaml")[0]
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    gpus = [t["resources"].get("GPU", 0) for t in config["available_node_types"].values()]
    assert max(gpus) == 8
    start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    commands = [*config["setup_commands"], *config.get("head_setup_commands", [])]
    commands += [line.split("#", 1)[1].strip() for line in (INFRA / "cluster" / "aws-gpu.yaml").read_text().splitlines()
                 if line.startswith("#   addctl")]  # fmt: skip
    checked = 0
    for line in commands:
        if "addctl " in line:
            command = "addctl " + line.split("addctl ", 1)[1]
            args = check_addctl(command)
            checked += 1
            for arg in args:
                if arg.endswith(".yaml") and "jobs/" in arg:
                    load_job(ROOT / arg[arg.index("jobs/") :])
    assert checked >= 2


def test_local_readme_commands_parse():
    text = (INFRA / "local" / "README.md").read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines() if line.startswith("addctl ")]
    assert len(lines) >= 4
    for line in lines:
        check_addctl(line.split("&&")[0].strip())


def test_an_unknown_option_is_caught():
    with pytest.raises(click.UsageError):
        check_addctl("addctl run jobs/demo.yaml --no-such-option")


# ---- the image and serving: checked as files (no Docker here), against ray, pyproject and the CLI --

DOCKERFILE = INFRA / "docker" / "Dockerfile"
THIRD_PARTY_IMAGES = {"postgres:16"}
BUILD = re.compile(r"^#\s+docker build -f infra/docker/Dockerfile (?:--build-arg VARIANT=(\w+) )?-t (\S+) \.$", re.M)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def built_images() -> dict[str, str]:
    """Image tag -> variant, for every build command the Dockerfile documents."""
    default = dockerfile_args()["VARIANT"]
    return {tag: variant or default for variant, tag in BUILD.findall(DOCKERFILE.read_text())}


def containers(node):
    """Every container spec (a mapping with an ``image``) anywhere in a manifest."""
    if isinstance(node, dict):
        if "image" in node and "name" in node:
            yield node
        for value in node.values():
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def test_the_dockerfile_builds_the_pinned_ray_with_this_package_as_pyproject_says():
    from packaging.requirements import Requirement

    text, args, project = DOCKERFILE.read_text(), dockerfile_args(), pyproject()["project"]
    requirements = {r.name: r for r in map(Requirement, project["dependencies"])}
    assert args["RAY_VERSION"] == ray.__version__ and ray.__version__ in requirements["ray"].specifier
    assert "serve" in requirements["ray"].extras  # the image serves, too
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}" in text
    torch_pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == torch_pin and torch_pin in requirements["torch"].specifier
    assert '--index-url "https://download.pytorch.org/whl/${VARIANT}"' in text
    assert re.fullmatch(r"py3\d+", args["PYTHON"])
    extras = re.search(r'pip install --no-cache-dir "\.\[(\w+)\]"', text).group(1)
    assert extras in project["optional-dependencies"] and project["scripts"]["addctl"] == "orchestrator.cli:main"
    for folder in ("orchestrator", "workers", "jobs"):  # the packages pyproject installs, the job files
        assert re.search(rf"^COPY --chown=ray:users {folder} {folder}$", text, re.M), folder
    assert "WORKDIR /app" in text
    images = built_images()
    assert set(images.values()) == {"cu128", "cpu"}
    for tag, variant in images.items():
        assert tag == f"ghcr.io/add-distill/add-distill:{project['version']}-{variant}", tag


def test_every_manifest_runs_an_image_the_dockerfile_builds():
    images, checked = built_images(), 0
    for path in MANIFESTS:
        for doc in documents(path):
            for container in containers(doc):
                image = container["image"]
                if image in THIRD_PARTY_IMAGES:
                    continue
                assert image in images, f"{path}: {image} is built by nothing (infra/docker/Dockerfile builds {images})"
                gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                assert images[image].startswith("cu") or gpus == 0, f"{path}: a GPU pod on a CPU image"
                assert container.get("workingDir", "/app") == "/app", path
                checked += 1
            if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
                spec = doc["spec"]
                cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
                assert cluster["rayVersion"] == dockerfile_args()["RAY_VERSION"], f"{path}: rayVersion"
    assert checked >= 10


def test_the_rayservice_deploys_the_serve_config_that_addctl_serve_would():
    from orchestrator.cli import serve as serve_command
    from orchestrator.serve import APP_NAME, IMPORT_PATH
    from orchestrator.serve_options import ServeOptions

    ((path, service),) = by_kind("RayService")
    config_file = INFRA / "serve" / "student.yaml"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config == documents(config_file)[0], f"{path}: serveConfigV2 is not {config_file}"
    (app,) = config["applications"]
    assert (app["name"], app["import_path"]) == (APP_NAME, IMPORT_PATH)
    module, function = app["import_path"].split(":")
    built = getattr(importlib.import_module(module), function)(app["args"])  # what Serve calls, without Ray
    assert type(built).__name__ == "Application"
    options = ServeOptions.model_validate(app["args"])
    # the comment's addctl command is the same application
    line = next(line for line in config_file.read_text().splitlines() if line.startswith("#   addctl serve"))
    args = check_addctl(line[1:].strip())
    params = serve_command.make_context("serve", args[1:]).params
    assert {k: params[k] for k in app["args"]} == app["args"]
    assert set(ServeOptions.model_fields) - {"model", "tracking_uri"} <= set(params), "a Serve arg addctl lacks"
    # the cluster holds the replicas it asks for, on the GPU image, with token auth and no secret in clear
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    workers = cluster["workerGroupSpecs"]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
               for g in workers for c in g["template"]["spec"]["containers"])  # fmt: skip
    assert gpus >= options.replicas * options.num_gpus
    for group in [cluster["headGroupSpec"], *workers]:
        for container in group["template"]["spec"]["containers"]:
            assert {"containerPort": 8000, "name": "serve"} in container["ports"]
            for var in container.get("env", []):
                assert not (SECRET_NAME.search(var["name"]) and "value" in var), f"{path}: {var['name']} in clear"


# ---- the local stack ----------------------------------------------------------------------------


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((parts.hostname, parts.port)) == 0


@pytest.mark.slow
def test_stack_up_and_down_on_loopback(monkeypatch):
    folder = Path(tempfile.mkdtemp(prefix="addstack-", dir="/tmp"))
    token = folder / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    planted = {  # the shell's credentials: no service may get them (one is passed to Ray on purpose)
        "AWS_SECRET_ACCESS_KEY": "real-cloud-secret-6b2f",
        "ADD_TEST_DB_PASSWORD": "db-password-9d1e",
        "DATABASE_URL": "postgresql://app:url-password-3c7a@db/app",
        "ADD_TEST_PASSED_TOKEN": "passed-token-4e8b",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    try:
        args = ["--num-cpus", "4", "--object-store-mb", "128", "--pass-env", "ADD_TEST_PASSED_TOKEN"]
        up = runner.invoke(main, ["stack", "up", "--dir", str(folder), *args])
        assert up.exit_code == 0, up.output
        state = json.loads((folder / "stack.json").read_text())
        services = {s["name"]: s for s in state["services"]}
        assert set(services) == {"ray", "mlflow", "s3"}
        for service in services.values():
            assert urlsplit(service["url"]).hostname == "127.0.0.1"
            with urllib.request.urlopen(service["health"], timeout=10) as r:
                assert r.status == 200, service["name"]
        # Ray: the Jobs API answers with the stack's token, the token is never printed
        version = urllib.request.Request(
            f"{services['ray']['url']}/api/version", headers={"Authorization": f"Bearer {token.read_text()}"}
        )
        with urllib.request.urlopen(version, timeout=10) as r:
            assert json.load(r)["ray_version"] == ray.__version__
        assert token.read_text() not in up.output
        for service in services.values():  # what each service was started with
            environ = Path(f"/proc/{service['pid']}/environ").read_bytes().decode(errors="replace")
            leaked = [k for k, v in planted.items() if v in environ and k != "ADD_TEST_PASSED_TOKEN"]
            assert leaked == [], f"{service['name']} got {leaked}"
            assert ("passed-token-4e8b" in environ) == (service["name"] == "ray")
        # S3: the bucket exists; MLflow: its store is in the folder
        import boto3

        s3 = boto3.client("s3", endpoint_url=services["s3"]["url"], region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")  # fmt: skip
        assert stack.BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        search = f"{services['mlflow']['url']}/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(search, timeout=10) as r:
            assert r.status == 200
        assert (folder / "mlflow.db").exists()
        env = (folder / "env.sh").read_text()
        assert f"MLFLOW_TRACKING_URI={services['mlflow']['url']}" in env and f"RAY_AUTH_TOKEN_PATH={token}" in env
        status = runner.invoke(main, ["stack", "status", "--dir", str(folder)])
        assert status.exit_code == 0 and status.output.count("healthy") == 3
        again = runner.invoke(main, ["stack", "up", "--dir", str(folder)])
        assert again.exit_code == 1 and "already up" in again.output
        down = runner.invoke(main, ["stack", "down", "--dir", str(folder)])
        assert down.exit_code == 0, down.output
        for service in services.values():
            assert not stack.alive(service["pid"]), service["name"]
            assert not port_open(service["url"]), service["name"]
        assert not (folder / "stack.json").exists()
        logs = {p.name for p in (folder / "logs").iterdir()}
        assert logs == {"ray.log", "mlflow.log", "s3.log"} and (folder / "mlflow.db").exists()
    finally:
        if (folder / "stack.json").exists():
            stack.down(folder)
        shutil.rmtree(folder, ignore_errors=True)
