"""Shared fixtures: real services started on 127.0.0.1 for the tests that claim them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from retrain_lib.core.storage import S3Settings, Storage, open_storage

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


class MlflowServer:
    """A real MLflow tracking server on 127.0.0.1: a SQLite backend under ``root`` and proxied
    artifacts in ``artifacts`` (a folder or ``s3://bucket/prefix``; the server reaches S3
    with ``env``, as the compose stack's server does). :meth:`stop` and :meth:`start` take it
    down and bring it back on the same port with the same data, as a restarted service."""

    def __init__(self, root: Path, *, artifacts: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.artifacts = artifacts or str(root / "artifacts")
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        with open(self.root / "server.log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", self.artifacts],
                stdout=subprocess.DEVNULL, stderr=log, cwd=self.root, env=self.env,
                start_new_session=True)  # its own group: the server forks workers
        wait_for_port(self.port, timeout_s=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError((self.root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self._proc is None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None


@contextlib.contextmanager
def mlflow_server(root: Path, *, artifacts: str | None = None,
                  env: Mapping[str, str] | None = None) -> Iterator[MlflowServer]:
    """A started :class:`MlflowServer`, stopped at the end."""
    server = MlflowServer(root, artifacts=artifacts, env=env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class SocketProxy:
    """A forwarder in front of a server: a TCP port on 127.0.0.1 (``target`` an int) or a
    Unix socket (``target`` its path; the proxy listens on ``listen_path``). :meth:`stop`
    closes it and every connection through it, so clients get connection errors as from a
    stopped server; :meth:`start` opens it again at the same address."""

    def __init__(self, target: int | str, listen_path: Path | None = None) -> None:
        self.target = target
        self.listen_path = listen_path
        self.port = free_port() if listen_path is None else 0
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.bytes_to_client = 0
        """Bytes the server sent through the proxy (what a client fetched), for tests."""
        self.stop_after_bytes: int | None = None
        """Stop the proxy, as a server that goes away mid-read, once this many bytes went."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` or ``unix://<path>``."""
        return f"unix://{self.listen_path}" if self.listen_path else \
            f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.listen_path is not None:
            self.listen_path.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(self.listen_path))
        else:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, int):
            return socket.create_connection(("127.0.0.1", self.target))
        server = socket.socket(socket.AF_UNIX)
        server.connect(self.target)
        return server

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink, counted in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pipe, args=(source, sink, counted),
                                 daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
                if counted:
                    with self._lock:
                        self.bytes_to_client += len(data)
                        cut = (self.stop_after_bytes is not None
                               and self.bytes_to_client >= self.stop_after_bytes)
                    if cut:
                        threading.Thread(target=self.stop, daemon=True).start()
                        return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def drop_region(folder: Path, region: str, scenes: int, seed: int) -> None:
    """An analyst's drop: ``scenes`` small synthetic scenes with their annotations."""
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    make_drop(folder, [SceneSpec(scene_id=f"s{i}", width=256, height=256, region=region,  # type: ignore[arg-type]
                                 objects_per_class=3, decoys=2, seed=seed + i)
                       for i in range(scenes)])
    (folder / "drop.json").write_text(f'{{"region": "{region}"}}')


def good_and_bad_drops(drops: Path) -> None:
    """Two drops under ``drops``: ``region-a`` (3 good scenes) and ``bad`` (one scene whose
    first feature has the unknown class ``boat``: it must be quarantined)."""
    drop_region(drops / "region-a", "vegetated", 3, seed=10)
    drop_region(drops / "bad", "vegetated", 1, seed=20)
    labels = json.loads((drops / "bad" / "s0.geojson").read_text())
    labels["features"][0]["properties"]["class"] = "boat"
    (drops / "bad" / "s0.geojson").write_text(json.dumps(labels))


def put_folder(storage: Storage, folder: Path, prefix: str) -> None:
    """Upload a local folder's files under ``prefix``, as an analyst's upload would."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.put_file(path, f"{prefix}/{path.relative_to(folder).as_posix()}")


@dataclass(frozen=True)
class Backend:
    """Where a whole cycle keeps its data: the embedded default, or the compose stack's."""

    name: str
    storage_uri: str
    s3: S3Settings | None = None
    mlflow_uri: str | None = None
    mlflow_artifacts: str | None = None
    mlflow: MlflowServer | None = None
    s3_proxy: SocketProxy | None = None
    """With ``outages=True``: what the cycle's processes reach S3 through, to cut it off."""

    def storage(self) -> Storage:
        return open_storage(self.storage_uri, s3=self.s3)

    def environment(self) -> dict[str, str]:
        """What a user sets for a process to reach this backend."""
        env = {"AUTORETRAIN_STORAGE": self.storage_uri}
        if self.s3 is not None:
            public, private = self.s3.environment()
            env.update(public)
            env.update(private)
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env


def new_bucket(s3: S3Settings, prefix: str) -> str:
    """A fresh, empty bucket on the S3 server ``s3`` names; its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region_name or "us-east-1",
                 aws_access_key_id=s3.aws_access_key_id,
                 aws_secret_access_key=s3.aws_secret_access_key).create_bucket(Bucket=name)
    return name


BACKENDS = ["local", "s3"]
PLANTED_SECRET = "planted-s3-secret-7f3a9c"
"""The S3 backend's secret key: it must never appear in anything a cycle writes."""


@contextlib.contextmanager
def storage_backend(name: str, root: Path, request: pytest.FixtureRequest, *,
                    outages: bool = False) -> Iterator[Backend]:
    """``local``: storage under ``root`` and no MLflow server (the caller's default).
    ``s3``: as the compose stack has it, storage in a fresh bucket of the S3 server over HTTP
    and a real MLflow server whose artifacts live in the same S3 server. With ``outages``,
    everything reaches S3 through a :class:`SocketProxy` (``Backend.s3_proxy``) that a test can
    stop and start again (the S3 server itself keeps its data in memory)."""
    if name == "local":
        yield Backend(name, str(root / "storage"))
        return

    endpoint = request.getfixturevalue("s3_endpoint")
    proxy = None
    if outages:
        proxy = SocketProxy(int(endpoint.rsplit(":", 1)[1]))
        proxy.start()
        endpoint = proxy.url
    # A recognisable secret: tests grep what a cycle wrote for it (moto accepts any key).
    s3 = S3Settings(endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="testing", aws_secret_access_key=PLANTED_SECRET)
    bucket = new_bucket(s3, "cycle")
    public, private = s3.environment()
    artifacts = f"s3://{bucket}/mlflow"
    try:
        with mlflow_server(root / "mlflow-server", artifacts=artifacts,
                           env={**public, **private}) as server:
            yield Backend(name, f"s3://{bucket}/data", s3, server.url, artifacts, server, proxy)
    finally:
        if proxy is not None:
            proxy.stop()


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


# --------------------------------------------------------------------------- PostgreSQL, Redis


def _postgres_admin() -> Any:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                            connect_timeout=3)
    conn.autocommit = True
    return conn


def postgres_available(what: str) -> bool:
    """Whether PostgreSQL answers on 127.0.0.1:5432; in CI (``$CI`` set) it must."""
    try:
        _postgres_admin().close()
        return True
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) for "
                        f"{what}: {exc}")
        return False


@contextlib.contextmanager
def postgres_database(prefix: str = "autoretrain_test") -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped at the end; its SQLAlchemy URL
    (``postgresql+psycopg2://``)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = _postgres_admin()
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = _postgres_admin()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def metadata_database(fallback: Path) -> Iterator[str]:
    """A fresh Airflow metadata database: PostgreSQL when it answers (required in CI), else
    SQLite at ``fallback``."""
    if not postgres_available("the DAG tests"):
        yield f"sqlite:///{fallback}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(autouse=True)
def _isolate_home_state(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep Ultralytics' settings and MLflow's defaults out of the user's home and the repo."""
    settings = tmp_path_factory.getbasetemp() / "yolo-config"
    settings.mkdir(exist_ok=True)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(settings))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


# --------------------------------------------------------------------------- xdist scheduling


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order for ``make test`` (``-n 2 --dist loadscope --no-loadscope-reorder``): modules
    with slow tests first, so that no long test starts last and ends the run alone. A module's
    tests (a class's, where a module splits its slow tests into classes) share a worker, so
    its fixtures are built once; the order inside a module is kept."""
    slow = {item.module.__name__ for item in items  # type: ignore[attr-defined]
            if item.get_closest_marker("slow")}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (item.module.__name__ not in slow,  # type: ignore[attr-defined]
                                 order[id(item)]))
