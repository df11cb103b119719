"""``addctl serve-bench``: what serving costs. Images/s and p50/p99 latency of ``POST /generate`` at
1, 8 and 32 concurrent clients (one prompt per request), batching on and off, against the same
student called in this process on the same batch sizes, with the same torch threads as a replica.

Each client keeps one HTTP connection and sends its requests back to back; a level's throughput is
its images over its wall time. The one-process rows time ``ServedStudent.sample`` (network calls and
PNG encoding, what a replica does per batch) after a warm-up call; their latency is one call's.
A last row sends ``GET /health`` from the most clients: the requests/s the HTTP path itself allows.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import numpy as np

PROMPTS = ["a black sneaker", "a white bag", "a dress", "a coat with long sleeves", "an ankle boot"]


@dataclass
class Row:
    """One measured configuration."""

    mode: str  # "one process", "serve, batching", "serve, no batching", "serve, GET /health" (no model)
    clients: int  # concurrent clients (one process: the batch size)
    requests: int
    images_per_s: float  # requests/s for GET /health
    p50_ms: float
    p99_ms: float
    mean_batch: float  # images per network call a request shared (the server's X-Batch-Images)
    student_ms: float  # p50 of the student call that computed a request (the server's Server-Timing)


def _stats(mode, clients: int, latencies: list[float], images: int, wall_s: float, batch: list, student: list) -> Row:
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return Row(mode, clients, len(latencies), images / wall_s, float(p50), float(p99), float(np.mean(batch)),
               float(np.median(student)))  # fmt: skip


def one_process(model, batch_sizes: list[int], repeats: int) -> list[Row]:
    """The student called here on ``batch_sizes`` prompts at once, ``repeats`` timed calls each."""
    from orchestrator.serve_request import GenerateRequest

    rows = []
    for size in batch_sizes:
        request = GenerateRequest(tuple(PROMPTS[i % len(PROMPTS)] for i in range(size)), seed=size)
        model.sample([request])  # warm-up
        latencies = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.sample([request])
            latencies.append(time.perf_counter() - started)
        ms = [t * 1000 for t in latencies]
        rows.append(_stats("one process", size, latencies, size * repeats, sum(latencies), [size], ms))
    return rows


def drive(url: str, clients: int, requests: int, warmup: int = 2, health: bool = False) -> tuple:
    """``requests`` one-prompt requests from ``clients`` threads (``health``: ``GET /health`` instead, the
    HTTP path without the model): the latency of each, the wall time, the images each was computed
    with and how long (ms) that student call took. Raises on a non-200."""
    parts = urlsplit(url)
    barrier, latencies, failures, batches, students = threading.Barrier(clients + 1), [], [], [], []
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(i: int, count: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)

        def ask(n: int) -> tuple[float, int]:
            body = json.dumps({"prompt": PROMPTS[n % len(PROMPTS)], "seed": n})
            started = time.perf_counter()
            if health:
                connection.request("GET", "/health")
            else:
                connection.request("POST", "/generate", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                failures.append(response.status)
            timing = response.getheader("Server-Timing", "student;dur=0")
            return (time.perf_counter() - started, int(response.getheader("X-Batch-Images", "0")),
                    float(timing.split("dur=", 1)[1].split(",")[0]))  # fmt: skip

        try:
            for n in range(warmup):
                ask(n)
            barrier.wait()
            for n in range(count):
                latency, batch, student = ask(1000 * i + n)
                latencies.append(latency)
                batches.append(batch)
                students.append(student)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i, c), daemon=True) for i, c in enumerate(per_client)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed (status {sorted(set(failures))})")
    return latencies, wall, batches, students


def bench(options, clients: list[int], requests: int, repeats: int, port: int, on_row=None) -> list[Row]:
    """Every row. Each served level with batching follows the one-process row of its batch size, so
    the two are measured under the same load of the machine; then the levels without batching."""
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from orchestrator.serve import start, stop
    from orchestrator.served_model import ModelRef, load, resolve

    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        (on_row or (lambda _: None))(row)

    torch.set_num_threads(max(1, int(options.num_cpus)))  # a replica's threads
    client = MlflowClient(tracking_uri=options.tracking_uri, registry_uri=options.tracking_uri)
    ref = ModelRef.parse(options.model, client)
    model = load(ref, resolve(ref, client), client, "cuda" if options.num_gpus > 0 else "cpu")
    try:
        for batching in (True, False):
            url = start(options.model_copy(update={"batching": batching}), port=port)
            mode = f"serve, {'batching' if batching else 'no batching'}"
            for n in clients:
                if batching:
                    add(one_process(model, [n], repeats)[0])
                latencies, wall, batches, students = drive(url, n, max(requests, n))
                add(_stats(mode, n, latencies, len(latencies), wall, batches, students))
        n = max(clients)  # the ceiling the HTTP path sets: requests/s with no model call
        latencies, wall, batches, students = drive(url, n, max(requests, n), health=True)
        add(_stats("serve, GET /health", n, latencies, len(latencies), wall, batches, students))
    finally:
        stop()
        ray.shutdown()
    return rows


def table(rows: list[Row]) -> str:
    """The rows as Markdown."""
    lines = ["| mode | clients (batch) | requests | images/s | p50 ms | p99 ms | images per call | student ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r.mode} | {r.clients} | {r.requests} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
              f"| {r.mean_batch:.1f} | {r.student_ms:.1f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    """The issue's two goals, read off the rows: throughput at the most clients, p99 at one."""
    alone = {r.clients: r for r in rows if r.mode == "one process"}
    batched = {r.clients: r for r in rows if r.mode == "serve, batching"}
    out = []
    most = max(batched)
    if most in alone:
        ratio = batched[most].images_per_s / alone[most].images_per_s
        met = "met" if ratio >= 0.8 else "missed"
        out.append(f"{most} clients, batching: {batched[most].images_per_s:.1f} images/s = {ratio:.2f}× one process "
                   f"at batch {most} ({alone[most].images_per_s:.1f}); goal ≥ 0.8×: {met}")
    if 1 in alone and 1 in batched:
        ratio = batched[1].p99_ms / alone[1].p50_ms
        out.append(f"1 client, batching: p99 {batched[1].p99_ms:.1f} ms = {ratio:.2f}× one bare call "
                   f"({alone[1].p50_ms:.1f} ms); goal ≤ 1.5×: {'met' if ratio <= 1.5 else 'missed'}")
    return out


def to_json(rows: list[Row]) -> str:
    return json.dumps({"rows": [asdict(r) for r in rows], "goals": verdict(rows)}, indent=2)
