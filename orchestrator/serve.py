"""``addctl serve``: a registered student behind HTTP on Ray Serve, following the registry's alias.

One deployment, ``StudentServer``, is the application: replicas (CPUs/GPUs each) that load the
student through its pyfunc and answer

- ``POST /generate``: ``{"prompts": [...], "steps": 1, "seed": 0, "format": "json"}`` (see
  ``orchestrator.serve_request``): PNG for one image, else JSON with base64 PNGs; a bad request
  gets a 4xx with ``{"error": "<one line>"}``;
- ``GET /health``: ``{"status": "ok", "version": ...}``;
- ``GET /model``: the registered version, alias, steps, teacher it serves, and how it follows.

Requests are batched with ``@serve.batch``: up to ``max_batch_size`` images per network call
(counted in prompts, so the limit also caps a request), waiting at most ``batch_wait_s`` for a
batch to fill. The student computes on one thread beside the event loop (``BatchQueue``), so
requests keep arriving while it computes, and the batches Serve closes meanwhile merge into the
next network call. Each answer says how many images it was computed with (``X-Batch-Images``) and
how long that call and the whole request in the replica took (``Server-Timing: student;dur=<ms>,
replica;dur=<ms>``): the rest of a client's latency is the HTTP path (proxy, routing).

Following the alias: for ``models:/NAME@ALIAS`` every replica asks the registry every ``poll_s``
seconds (± 25 %, so replicas move one at a time) which version the alias names; when it moved, the
replica loads the new version beside the old one, which keeps answering, and swaps between two
batches. A batch in flight finishes on the version it started with, so a promotion fails no
request and costs no capacity; each answer names its version (``X-Model-Version``). A version
that fails to load, or an alias deleted, leaves the replica serving what it had, and ``GET /model``
says why. This works the same on a cluster from a Serve config (``infra/serve/``), where no
``addctl`` process stays behind to redeploy.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestrator.batch_queue import BatchQueue
from orchestrator.serve_options import ServeOptions
from orchestrator.serve_request import BadRequest, GenerateRequest, Limits, parse_request

APP_NAME = "add-student"
IMPORT_PATH = "orchestrator.serve:app_builder"  # what a Serve config's import_path names
ROUTES = {"/generate": "POST", "/health": "GET", "/model": "GET"}
logger = logging.getLogger("ray.serve")


def _images_in(requests: list[GenerateRequest]) -> int:
    return sum(len(r.prompts) for r in requests)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status)


@serve.deployment(name="StudentServer", health_check_period_s=5, graceful_shutdown_timeout_s=30)
class StudentServer:
    """Replicas of the served student (see the module docstring)."""

    def __init__(self, options: dict):
        import mlflow
        import torch
        from mlflow.tracking import MlflowClient

        from orchestrator.served_model import ModelRef, load, resolve

        self.options = ServeOptions.model_validate(options)
        self.device = "cuda" if self.options.num_gpus > 0 else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(self.options.num_cpus)))
        uri = self.options.tracking_uri
        if uri:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.ref = ModelRef.parse(self.options.model, self.client)
        self.current = load(self.ref, resolve(self.ref, self.client), self.client, self.device)
        self.follow_error: str | None = None
        o = self.options
        self._queue = BatchQueue(self._sample, lambda r: _images_in([r]), o.max_batch_size, merge=o.batching)
        self._batched.set_max_batch_size(o.max_batch_size)
        self._batched.set_batch_wait_timeout_s(o.batch_wait_s)
        self._stop = threading.Event()
        if self.ref.alias is not None:
            threading.Thread(target=self._follow, name="alias-follower", daemon=True).start()

    # ---- following the alias --------------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.wait(self.options.poll_s * random.uniform(0.75, 1.25)):
            self.check_alias()

    def check_alias(self) -> None:
        """Load and swap in the version the alias names now, if it moved; on failure keep serving."""
        from orchestrator.served_model import load, resolve

        try:
            version = resolve(self.ref, self.client)
            if version != self.current.version:
                old = self.current.version
                logger.info(f"{self.ref.uri} moved to v{version}: loading it (v{old} answers meanwhile)")
                self.current = load(self.ref, version, self.client, self.device)  # one assignment: the swap
                logger.info(f"now serving {self.current.uri}")
            self.follow_error = None
        except Exception as err:  # noqa: BLE001  (a registry hiccup or a broken version must not stop serving)
            self.follow_error = f"{type(err).__name__}: {err}; still serving v{self.current.version}"
            logger.warning(self.follow_error)

    def __del__(self):
        self._stop.set()

    # ---- computing ------------------------------------------------------------------------------

    def _sample(self, requests: list[GenerateRequest]) -> list:
        """(version, PNGs, images computed together, seconds the call took) per request, or a
        ``BadRequest`` for one the current version cannot serve."""
        model = self.current  # a batch runs on one version, whatever the follower swaps meanwhile
        fits = [r for r in requests if r.steps <= model.max_steps]
        started = time.perf_counter()
        images = iter(model.sample(fits)) if fits else iter(())
        took = time.perf_counter() - started
        together = {s: sum(len(r.prompts) for r in fits if r.steps == s) for s in {r.steps for r in fits}}
        return [
            (model, next(images), together[r.steps], took) if r.steps <= model.max_steps
            else BadRequest(f"steps must be in 1..{model.max_steps} for v{model.version}, got {r.steps}")
            for r in requests
        ]  # fmt: skip

    async def _alone(self, request: GenerateRequest):
        (result,) = await self._queue.submit([request])
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, batch_size_fn=_images_in, max_concurrent_batches=1024)
    async def _batched(self, requests: list[GenerateRequest]) -> list:
        """A batch Serve closed; it joins the queue, where batches closed meanwhile merge into one call."""
        return await self._queue.submit(requests)

    # ---- HTTP -----------------------------------------------------------------------------------

    def limits(self) -> Limits:
        o = self.options
        return Limits(self.current.max_steps, o.max_batch_size, o.max_prompt_chars)

    def model_info(self) -> dict:
        current, o = self.current, self.options
        return {
            "model": o.model,
            "name": self.ref.name,
            "alias": self.ref.alias,
            "version": current.version,
            "uri": current.uri,
            "steps": current.max_steps,
            "timesteps": current.timesteps,
            "teacher": current.teacher,
            "following": self.ref.alias is not None,
            "poll_s": o.poll_s,
            "follow_error": self.follow_error,
            "batching": {"on": o.batching, "max_batch_size": o.max_batch_size, "batch_wait_s": o.batch_wait_s},
            "device": self.device,
        }

    async def __call__(self, request: Request) -> Response:
        arrived = time.perf_counter()
        path = request.url.path.rstrip("/") or "/"
        if path not in ROUTES:
            return _error(404, f"no route {path}: use {', '.join(f'{m} {p}' for p, m in ROUTES.items())}")
        if request.method != ROUTES[path]:
            return _error(405, f"{path} takes {ROUTES[path]}, not {request.method}")
        if path == "/health":
            return JSONResponse({"status": "ok", "version": self.current.version})
        if path == "/model":
            return JSONResponse(self.model_info())
        try:
            limits = self.limits()
            body = await request.body()
            if len(body) > 64 * 1024 + limits.max_prompts * limits.max_prompt_chars * 4:
                raise BadRequest(f"body of {len(body)} bytes is too large", status=413)
            wanted = parse_request(body, limits)
            result = await (self._batched(wanted) if self.options.batching else self._alone(wanted))
            if isinstance(result, BadRequest):
                raise result
        except BadRequest as err:
            return _error(err.status, str(err))
        model, images, together, took = result
        in_replica = time.perf_counter() - arrived
        headers = {"X-Model-Version": str(model.version), "X-Model-Uri": model.uri, "X-Batch-Images": str(together),
                   "Server-Timing": f"student;dur={took * 1000:.1f}, replica;dur={in_replica * 1000:.1f}"}  # fmt: skip
        if wanted.format == "png":
            return Response(images[0], media_type="image/png", headers=headers)
        body = {
            "model": model.uri,
            "version": model.version,
            "steps": wanted.steps,
            "seed": wanted.seed,
            "images": [base64.b64encode(png).decode("ascii") for png in images],
        }
        return Response(json.dumps(body), media_type="application/json", headers=headers)


def build_app(options: ServeOptions):
    """The Serve application for ``options``."""
    return StudentServer.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        max_ongoing_requests=max(8, 2 * options.max_batch_size),  # room for a batch to form on each replica
    ).bind(options.model_dump())


def app_builder(args: dict):
    """The application a Serve config builds (``import_path: orchestrator.serve:app_builder``, ``args``)."""
    return build_app(ServeOptions.model_validate(args))


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> str:
    """Deploy the application on the Ray at ``address`` (or ``RAY_ADDRESS``), else on a local Ray
    started here; returns its URL once every replica answers. Raises ``RuntimeError`` if it fails."""
    import os

    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # replicas log to Ray's session folder (logs/serve/); the console stays for people
        local = {"num_cpus": max(8, os.cpu_count() or 1), "include_dashboard": False}
        ray.init(**({"address": address} if address else local), log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's Serve chatter; the caller says what runs
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the application, its replicas done with what they were answering; a cluster's other
    applications stay (a local Ray's Serve ends with ``ray.shutdown()``)."""
    serve.delete(APP_NAME)
