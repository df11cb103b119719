"""The local stack on one machine (``addctl stack up|down|status``): a Ray head, an MLflow server and an
S3-compatible store (moto), all on 127.0.0.1 at free ports, with their logs and state in one folder::

    <folder>/stack.json     what runs: pids, ports, URLs (removed by ``down``)
    <folder>/env.sh         ``source`` it: RAY_API_SERVER_ADDRESS, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL...
    <folder>/logs/          ray.log, mlflow.log, s3.log
    <folder>/mlflow.db      the tracking server's SQL store (SQLite)
    <folder>/mlartifacts/   its artifact root (proxied: clients upload through the server)
    <folder>/ray/           Ray's session folders (sockets, per-process logs) when the path is short enough

Ray runs with token authentication: the token is read from (or, when missing, written to)
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, where ``addctl submit`` finds it. Moto keeps its
objects in memory: they go with ``down`` (the MLflow store and artifacts stay in the folder).

Each service gets only the variables it needs (``service_env``): the basics of a process (PATH,
HOME, locale...) and its own settings, never the shell's credentials. Moto accepts any keys, so the
Ray head's jobs get ``stack-local`` ones, not real cloud keys; a secret the jobs refer to as
``${env:NAME}`` is passed to the Ray head only when named (``addctl stack up --pass-env NAME``).

Every process is started in its own session and stopped by its pid (its own process group, then
any of its descendants left), never by name: other Ray clusters on the machine are left alone.
``start_ray_head`` is also what the tests use to get a real Ray head.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "stack.json"
LOOPBACK = "127.0.0.1"
BUCKET = "add"
RAY_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
MAX_SOCKET_DIR = 60  # Ray's unix socket paths under the temp dir must stay under 107 characters
# What any process needs from the shell, and what each service may take besides (by prefix).
BASE_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)  # fmt: skip
SERVICE_PREFIXES = {
    "s3": ("LC_", "MOTO_"),
    "mlflow": ("LC_", "MLFLOW_SERVER_", "MLFLOW_ENABLE_", "MLFLOW_SQLALCHEMYSTORE_", "GUNICORN_", "UVICORN_"),
    "ray": (
        "LC_", "RAY_", "ADD_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "CUDA_", "NCCL_",
        "OMP_", "MKL_", "TOKENIZERS_", "PYTORCH_", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
        "HTTPS_PROXY", "NO_PROXY",
    ),
}  # fmt: skip


class StackError(RuntimeError):
    """A service did not start or stop; the message names it and its log."""


@dataclass
class Service:
    """One started process: how to reach it and where its log is."""

    name: str
    pid: int
    url: str
    log: str
    health: str  # URL answering 200 when the service is ready
    extra: dict = field(default_factory=dict)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all held open at once while picked, so none is handed out twice
    (one at a time, the kernel may give back the port it just freed, and Ray refuses two components on one)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]


def default_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_token(path: Path) -> Path:
    """The Ray auth token file at ``path``, created (mode 600) when missing; its value is never printed."""
    if not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def service_env(service: str, environ: dict[str, str], passed: tuple[str, ...] = ()) -> dict[str, str]:
    """The part of ``environ`` that ``service`` (s3, mlflow, ray) needs: the basics and its own settings,
    never a credential (by its name or its shape) unless named in ``passed`` (for the Ray head's jobs)."""
    from workers.secrets import find_clear_secret, is_credential_name

    out = {}
    for name, value in environ.items():
        if name in passed:
            out[name] = value
        elif name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN") or is_credential_name(name) or find_clear_secret(value):
            continue
        elif name in BASE_ENV or name.startswith(SERVICE_PREFIXES[service]):
            out[name] = value
    return out


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def start_ray_head(
    folder: Path,
    *,
    num_cpus: int | None = None,
    token_path: Path | None = None,
    object_store_mb: int | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    """``ray start --head --block`` on loopback at free ports, token auth on; returns at once (see ``wait_healthy``)."""
    folder = Path(folder).resolve()
    ports = dict(zip(RAY_PORTS, free_ports(len(RAY_PORTS)), strict=True))
    token_path = ensure_token(Path(token_path or default_token_path()))
    temp_dir = folder / "ray"
    if len(str(temp_dir)) > MAX_SOCKET_DIR:
        temp_dir = Path(f"/tmp/addray-{os.getpid()}-{secrets.token_hex(3)}")
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}", "--include-dashboard=true",
        *(f"--{name}={port}" for name, port in ports.items()),
        f"--num-cpus={num_cpus or max(8, os.cpu_count() or 1)}", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    if object_store_mb:
        cmd.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    run_env = {k: v for k, v in (env or os.environ).items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    run_env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (nothing to drain here)
        "RAY_USAGE_STATS_ENABLED": "0",
        # a job's entrypoint (``python -m orchestrator.cli run``) runs the Python that runs Ray
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", os.defpath)]),
    }
    log = folder / "logs" / "ray.log"
    proc = _spawn(cmd, log, run_env)
    url = f"http://{LOOPBACK}:{ports['dashboard-port']}"
    return Service(
        "ray",
        proc.pid,
        url,
        str(log),
        f"{url}/api/gcs_healthz",
        {
            "gcs": f"{LOOPBACK}:{ports['port']}",
            "ports": ports,
            "temp_dir": str(temp_dir),
            "token_path": str(token_path),
        },
    )


def start_mlflow(folder: Path, env: dict[str, str] | None = None) -> Service:
    """``mlflow server`` with a SQLite store and an artifact root in ``folder``, proxying artifacts."""
    folder = Path(folder).resolve()
    port = free_port()
    (folder / "mlartifacts").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "mlartifacts"),
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = folder / "logs" / "mlflow.log"
    proc = _spawn(cmd, log, env)
    url = f"http://{LOOPBACK}:{port}"
    return Service("mlflow", proc.pid, url, str(log), f"{url}/health")


def start_s3(folder: Path, env: dict[str, str] | None = None) -> Service:
    """moto's S3 server (``python -m moto.server``); objects live in its memory."""
    port = free_port()
    log = Path(folder).resolve() / "logs" / "s3.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)], log, env)
    url = f"http://{LOOPBACK}:{port}"
    return Service("s3", proc.pid, url, str(log), f"{url}/moto-api/", {"bucket": BUCKET})


def healthy(service: Service) -> bool:
    try:
        with urllib.request.urlopen(service.health, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def wait_healthy(services: list[Service], timeout_s: float = 180, on_ready: Callable | None = None) -> None:
    """Return when every service answers its health check; ``StackError`` (with the log's tail) otherwise."""
    pending = list(services)
    deadline = time.monotonic() + timeout_s
    while pending:
        for service in list(pending):
            if healthy(service):
                pending.remove(service)
                if on_ready:
                    on_ready(service)
            elif not alive(service.pid) or time.monotonic() > deadline:
                why = "exited" if not alive(service.pid) else f"not healthy after {timeout_s:g} s"
                tail = Path(service.log).read_text(errors="replace")[-3000:] if Path(service.log).exists() else ""
                raise StackError(f"{service.name} {why} ({service.health}); its log {service.log} ends:\n{tail}")
        time.sleep(0.3)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers run in their own process groups)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop_process(pid: int, timeout_s: float = 30, group_first: bool = True) -> None:
    """Stop a process we started (SIGTERM, then SIGKILL), its process group and any descendants left."""
    below = descendants(pid)
    try:
        if group_first:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    for target in (pid, *below):
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            try:
                if target == pid or alive(target):
                    kill(target)
            except (ProcessLookupError, PermissionError):
                pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_service(service: Service, timeout_s: float = 30) -> None:
    """Stop a started service. Ray: SIGTERM to ``ray start --block`` alone (it tears its own processes
    down in order), then whatever is left; the others: their process group."""
    stop_process(service.pid, timeout_s, group_first=service.name != "ray")


# ---- the stack ------------------------------------------------------------------------------------


def load_state(folder: Path) -> dict | None:
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def services(state: dict) -> list[Service]:
    return [Service(**s) for s in state["services"]]


def env_exports(state: dict) -> dict[str, str]:
    """The variables that point ``addctl``, MLflow, boto3 and pyarrow at the stack (no secret among them)."""
    by_name = {s.name: s for s in services(state)}
    return {
        "RAY_API_SERVER_ADDRESS": by_name["ray"].url,
        "RAY_AUTH_TOKEN_PATH": by_name["ray"].extra["token_path"],
        "MLFLOW_TRACKING_URI": by_name["mlflow"].url,
        "AWS_ENDPOINT_URL": by_name["s3"].url,
        "AWS_ENDPOINT_URL_S3": by_name["s3"].url,
        "AWS_REGION": "us-east-1",
    }


def up(
    folder: Path,
    *,
    num_cpus: int | None = None,
    token_path: Path | None = None,
    object_store_mb: int | None = None,
    timeout_s: float = 180,
    on_ready: Callable[[Service], None] | None = None,
    pass_env: tuple[str, ...] = (),
) -> dict:
    """Start the three services, wait until each is healthy, create the bucket; returns the state written.

    ``pass_env``: variables of this environment the Ray head (and so its jobs) gets as they are.
    """
    from workers.secrets import environ

    folder = Path(folder).resolve()
    state = load_state(folder)
    if state and any(alive(s.pid) for s in services(state)):
        raise StackError(f"a stack is already up in {folder}: `addctl stack down --dir {folder}` first")
    folder.mkdir(parents=True, exist_ok=True)
    shell = environ()
    missing = [name for name in pass_env if name not in shell]
    if missing:
        raise StackError(f"--pass-env: not set in this environment: {', '.join(missing)}")
    started: list[Service] = []
    try:
        started.append(start_s3(folder, service_env("s3", shell)))
        started.append(start_mlflow(folder, service_env("mlflow", shell)))
        # jobs on this Ray use this S3 (moto takes any keys: never the shell's real ones) and this MLflow
        ray_env = service_env("ray", shell, tuple(pass_env)) | {
            "AWS_ENDPOINT_URL": started[0].url,
            "AWS_ENDPOINT_URL_S3": started[0].url,
            "AWS_ACCESS_KEY_ID": "stack-local",
            "AWS_SECRET_ACCESS_KEY": "stack-local",
            "AWS_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": started[1].url,
        }
        started.append(
            start_ray_head(
                folder, num_cpus=num_cpus, token_path=token_path, object_store_mb=object_store_mb, env=ray_env
            )
        )
        _write_state(folder, started)
        wait_healthy(started, timeout_s, on_ready)
        _create_bucket(started[0].url, BUCKET)
    except BaseException:
        for service in reversed(started):
            stop_service(service)
        (folder / STATE_FILE).unlink(missing_ok=True)
        raise
    state = _write_state(folder, started)
    return state


def _write_state(folder: Path, started: list[Service]) -> dict:
    state = {"folder": str(folder), "services": [asdict(s) for s in started]}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    if len(started) == 3:
        lines = [f"export {k}={v}" for k, v in env_exports(state).items()]
        lines.append("# moto accepts any credentials; boto3 and pyarrow need some (not your real ones):")
        lines.append("export AWS_ACCESS_KEY_ID=stack-local")
        lines.append("export AWS_SECRET_ACCESS_KEY=stack-local")
        (folder / "env.sh").write_text("\n".join(lines) + "\n")
    return state


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="stack", aws_secret_access_key="stack"
    )
    s3.create_bucket(Bucket=bucket)


def down(folder: Path, timeout_s: float = 30) -> list[str]:
    """Stop every service the folder's state names (Ray first); returns their names. State and logs stay."""
    folder = Path(folder).resolve()
    state = load_state(folder)
    if state is None:
        raise StackError(f"no stack in {folder} (no {STATE_FILE}): nothing to stop")
    stopped = []
    for service in sorted(services(state), key=lambda s: s.name != "ray"):
        if alive(service.pid) and _is_ours(service):
            stop_service(service, timeout_s)
        stopped.append(service.name)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _is_ours(service: Service) -> bool:
    """Guard against a recycled pid: the process must still be the command we started."""
    try:
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid
    marker = {"ray": "start --head", "mlflow": "mlflow server", "s3": "moto.server"}[service.name]
    return marker in cmdline


def status(folder: Path) -> dict[str, dict]:
    """Each service's URL, pid and whether it is running and healthy."""
    state = load_state(Path(folder).resolve())
    if state is None:
        return {}
    return {
        s.name: {"url": s.url, "pid": s.pid, "running": alive(s.pid), "healthy": healthy(s), "log": s.log}
        for s in services(state)
    }
