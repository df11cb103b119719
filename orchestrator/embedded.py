"""The embedded default: what ``addctl run`` uses unless the job or a flag points elsewhere.

- Ray: a local instance started in-process with more logical CPUs than cores (on 2 cores, Ray
  Data and Ray Train hang when the trainers reserve every CPU); or the cluster at ``--address`` /
  ``RAY_ADDRESS`` (set for a submitted job's driver).
- MLflow: ``--tracking-uri``, else the job's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a
  SQLite store ``$ADD_HOME/mlflow.db`` with artifacts in ``$ADD_HOME/mlartifacts``.
- Object storage: the job's ``storage.uri`` (default ``runs``, a local folder).

``ADD_HOME`` defaults to ``./runs`` (ignored by git).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "ADD_HOME"


def home() -> Path:
    """Where the embedded default keeps its MLflow store and artifacts."""
    return Path(os.environ.get(HOME_ENV) or "runs").expanduser().resolve()


def embedded_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None, job_uri: str | None = None) -> str:
    """The MLflow tracking URI by precedence: flag, job, ``MLFLOW_TRACKING_URI``, embedded store."""
    return explicit or job_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with its
    dashboard on 127.0.0.1; returns which, with the dashboard's URL."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=True)
        return f"Ray at {address}{_dashboard(context)}"
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    # the dashboard also serves the state API Ray Train's placement-group cleaner asks (without it, it warns)
    context = ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    return f"a local Ray ({cpus} logical CPUs){_dashboard(context)}"


def _dashboard(context) -> str:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return ""
    return f", dashboard {url if '://' in url else 'http://' + url}"
