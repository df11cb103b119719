"""Throughput of distributed ADD training on Ray, measured end to end from an S3 server on loopback.

Example (about 5 minutes on 2 CPU cores):
    addctl bench train --out results/train-benchmark.json

What it measures, on Fashion-MNIST shards written to a moto S3 server it starts on 127.0.0.1:

1. Ingest: images/s through the Ray Data pipeline the trainer uses (read from S3, PNG decode,
   resize, normalise, and the caption embedding in an actor pool), steady state (after the first
   batch) and with start-up, for one pass over the set.
2. Training with 1 and 2 workers, one torch thread and one CPU each, the same global batch: samples/s
   the trainer consumes and the fraction of step time spent waiting for data, both from the loop's
   own reports after the first (warm-up) interval.
3. Memory: per-rank bytes of the student's parameters plus its AdamW state with FSDP over 2 workers,
   against 1 worker.

The teacher is ``--teacher`` (e.g. ``jobs/fashion-mnist/teacher``) or, by default, the project's
Fashion-MNIST teacher architecture (``workers.diffusion.networks.fashion_mnist_unet``, 1.4M parameters,
32×32, MiniLM captions) with random weights: throughput does not depend on what it learned.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from workers.data.fashion_mnist import FASHION_MNIST_IDX
from workers.train.config import TrainJob
from workers.train.loop import TrainCallback

BUCKET = "bench"
INGEST_BATCH = 256


class MetricsFile(TrainCallback):
    """Appends every report's metrics to a JSON-lines file (the benchmark runs on one machine)."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server():
    """A moto S3 server on loopback; the AWS environment of this process points at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    os.environ.update(
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
    )
    return server


def random_teacher(folder: Path) -> str:
    """The Fashion-MNIST teacher's architecture with random weights, in the folder layout it ships in."""
    from diffusers import DDPMScheduler

    from workers.add.text_encoders import MINILM_PACKAGE
    from workers.diffusion.networks import SCHEDULER_CONFIG, fashion_mnist_unet

    fashion_mnist_unet().save_pretrained(folder / "unet")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "text_encoder.json").write_text(json.dumps({"package": MINILM_PACKAGE, "subfolder": "model"}))
    return str(folder)


def job_spec(teacher: str, data_uri: str, workers: int, batch_size: int, steps: int, log_every: int) -> TrainJob:
    return TrainJob.model_validate(
        {
            "name": f"benchmark-w{workers}",
            "teacher": {"source": teacher},
            "discriminator": {"backbone": "teacher"},
            "data": {
                "uri": data_uri,
                "resolution": 32,
                "channels": 1,
                "local_shuffle_buffer": 64,
                "embed_captions": True,
            },
            "train": {
                "steps": steps,
                "batch_size": batch_size,
                "log_every": log_every,
                "checkpoint_every": steps,
                "keep_checkpoints": 1,
            },
            "resources": {"num_workers": workers, "cpus_per_worker": 1, "data_cpus": 1, "fsdp": True},
        }
    )


def _stream_rate(ds) -> dict:
    """Rows/s of one pass over ``ds``: with start-up, and steady (first batch to last)."""
    start, stamps, rows = time.perf_counter(), [], 0
    for batch in ds.iter_batches(batch_size=INGEST_BATCH, batch_format="numpy"):
        rows += len(batch["pixels"])
        stamps.append((time.perf_counter(), rows))
    (t_first, rows_first), (t_last, _) = stamps[0], stamps[-1]
    # When everything was ready before the first batch came out (an actor slower to start than the
    # decoding), the batches arrive in a burst and a "steady" rate means nothing: None.
    burst = t_first - start > 0.8 * (t_last - start)
    return {
        "images": rows,
        "wall_s": t_last - start,
        "first_batch_s": t_first - start,
        "images_per_s": rows / (t_last - start),
        "steady_images_per_s": None if burst else (rows - rows_first) / (t_last - t_first),
    }


def measure_ingest(spec: TrainJob) -> dict:
    """One pass of the trainer's pipeline over the set, read on the driver: decode only, then decode
    and caption embedding (MiniLM in an actor, which caches each distinct caption)."""
    import functools

    from workers.data.ingest import build_dataset, embed_captions
    from workers.data.storage import storage_options
    from workers.train.models import caption_encoder

    d = spec.data

    def decoded():
        return build_dataset(
            d.uri,
            resolution=d.resolution,
            channels=d.channels,
            shuffle_buffer=d.local_shuffle_buffer,
            batch_size=INGEST_BATCH,
            storage=storage_options(d.storage_options, "data.storage_options"),
        )

    encoder = functools.partial(caption_encoder, spec.teacher.source, guidance=spec.teacher.guidance)
    return {
        "decode": _stream_rate(decoded()),
        "decode_and_embed": _stream_rate(embed_captions(decoded(), encoder, batch_size=INGEST_BATCH)),
    }


def measure_training(spec: TrainJob, storage: str, work: Path) -> dict:
    """A run of ``spec``; throughput and data wait from its reports after the first interval."""
    from workers.train.trainer import build_trainer, run_training

    log = work / f"{spec.name}.jsonl"
    start = time.perf_counter()
    run_training(build_trainer(spec, storage_path=storage, callbacks=[MetricsFile(str(log))], export=False))
    wall = time.perf_counter() - start
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    steady = reports[1:] or reports
    return {
        "workers": spec.resources.num_workers,
        "global_batch": spec.train.batch_size,
        "steps": spec.train.steps,
        "run_wall_s": wall,
        "samples_per_s": statistics.mean(r["throughput/samples_per_s"] for r in steady),
        "step_s": statistics.mean(r["time/step_s"] for r in steady),
        "data_wait_fraction": statistics.mean(r["time/data_wait_fraction"] for r in steady),
        "data_wait_fraction_max": max(r["time/data_wait_fraction_max"] for r in steady),
        "data_wait_fraction_first_interval": reports[0]["time/data_wait_fraction"],
        "cpu_utilization_per_worker": statistics.mean(r["time/cpu_utilization"] for r in steady),
        "student_state_bytes_per_rank": reports[-1]["memory/student_state_bytes_per_rank"],
        "rss_bytes_max": max(r["memory/rss_bytes_max"] for r in reports),
    }


def run(
    *,
    images: int = 16384,
    rows_per_shard: int = 1024,
    steps: int = 30,
    log_every: int = 10,
    batch_size: int = 32,
    cpus: int = 8,
    teacher: str | None = None,
    idx_dir: str = FASHION_MNIST_IDX,
) -> dict:
    """The whole benchmark: ``images`` Fashion-MNIST images written to a loopback S3 server in shards of
    ``rows_per_shard``, then ingest and training (``steps`` of ``batch_size``, a report every
    ``log_every``) on a Ray of ``cpus`` logical CPUs; ``teacher`` default: random weights."""
    import ray

    from workers.data.shards import prepare_fashion_mnist

    load_before = os.getloadavg()
    server = start_s3_server()
    try:
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=BUCKET)
        data_uri = f"s3://{BUCKET}/fashion-mnist"
        prepare_fashion_mnist(idx_dir, data_uri, limit=images, rows_per_shard=rows_per_shard)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            source = teacher or random_teacher(work / "teacher")
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
            ray.data.DataContext.get_current().enable_progress_bars = False
            specs = {w: job_spec(source, data_uri, w, batch_size, steps, log_every) for w in (1, 2)}
            ingest = measure_ingest(specs[1])
            training = {w: measure_training(specs[w], f"s3://{BUCKET}/runs", work) for w in (1, 2)}
            ray.shutdown()
    finally:
        server.stop()
    one, two = training[1], training[2]
    return {
        "teacher": teacher or "fashion_mnist_unet (random weights)",
        "cpu_cores": os.cpu_count(),
        "ray_logical_cpus": cpus,
        "load_average_1m_before_and_after": [load_before[0], os.getloadavg()[0]],  # other users of the cores
        "ingest": ingest,
        "training": {"1_worker": one, "2_workers": two},
        # conservative: the ingest rate with its start-up, against the trainer's steady consumption
        "ingest_over_consumption_2_workers": ingest["decode_and_embed"]["images_per_s"] / two["samples_per_s"],
        "speedup_2_vs_1_workers": two["samples_per_s"] / one["samples_per_s"],
        "memory_per_rank_2_vs_1_workers": max(two["student_state_bytes_per_rank"])
        / max(one["student_state_bytes_per_rank"]),
    }
