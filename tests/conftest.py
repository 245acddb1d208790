"""Shared fixtures: real services started on 127.0.0.1 for the tests that claim them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 API: moto in server mode, in its own process on 127.0.0.1."""
    port = free_port()
    moto_server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment a user would set to point AutoRetrain at an S3-compatible server."""
    monkeypatch.setenv("AUTORETRAIN_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AUTORETRAIN_S3_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint


@pytest.fixture()
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _isolate_home_state(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Ultralytics' settings and MLflow's defaults out of the user's home and the repo."""
    settings = tmp_path_factory.getbasetemp() / "yolo-config"
    settings.mkdir(exist_ok=True)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(settings))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
