"""Shared test settings: CPU only, few threads, deterministic, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's default (60 s) for a new worker process to register was too short on 2 loaded cores: Serve's actors
# were cancelled before they started ("The actor never ran") while the suite shared the CPU with training
os.environ.setdefault("RAY_worker_register_timeout_seconds", "300")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the suite shares 2 cores with Ray workers and servers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


from tests.mlflow_server import mlflow_server, mlflow_tracking  # noqa: E402, F401
from tests.s3_server import moto_server, s3_server  # noqa: E402, F401  (S3 fixtures for every module)
