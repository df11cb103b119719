"""Pytest fixtures: an S3 server (moto) on loopback and the environment boto3, s3fs and pyarrow read.

Import both fixtures from ``tests/conftest.py``::

    from tests.s3_server import moto_server, s3_server  # noqa: F401

``moto_server`` (session scope) starts one ``ThreadedMotoServer`` on 127.0.0.1 at a free port and
stops it at the end. ``s3_server`` (function scope) empties it, points the AWS environment at it
through ``monkeypatch`` (endpoint, region, fake credentials; profiles and config files and the
instance-metadata lookup switched off) and returns an ``S3Server`` with helpers.
"""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass

import pytest

# Fake, but distinctive: tests assert that these values never appear in an error or a log line.
ACCESS_KEY = "AKIAMOTOTESTKEY7Q2Z"
SECRET_KEY = "moto-secret-never-log-9f8e7d6c5b4a"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the credentials the environment carries."""

    host: str
    port: int
    region: str = REGION
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket; returns its ``s3://`` URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(host="127.0.0.1", port=port)
    finally:
        server.stop()


@pytest.fixture
def s3_server(moto_server: S3Server, monkeypatch, tmp_path) -> S3Server:
    """An empty S3 server, with the AWS environment (endpoint, region, credentials) pointing at it."""
    reset = urllib.request.Request(f"{moto_server.endpoint_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    point_aws_at(moto_server, monkeypatch, tmp_path)
    return moto_server


def point_aws_at(server, monkeypatch, tmp_path) -> None:
    """The AWS environment (endpoint, region, credentials) of this process pointing at ``server`` alone:
    no profile, no config file, no instance metadata."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_REGION": server.region,
        "AWS_DEFAULT_REGION": server.region,
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
