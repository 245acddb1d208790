"""The compose stack's services as native processes, for machines where containers cannot run.

docker-compose.yml runs PostgreSQL, MinIO, an MLflow server and Airflow (api-server,
scheduler, dag-processor, triggerer, Celery workers on Redis). :class:`ServiceStack` starts the
same Airflow and MLflow services, with the same settings and environment names
(:meth:`ServiceStack.airflow_environment`; a test holds the two to agree), against a PostgreSQL,
a Redis and an S3 server that are already running. Each Celery worker serves its own queues,
as ``runner.queue`` expects. Every process runs in its own group and dies with its caller.

Nothing here imports Airflow: the services read their settings from their environment.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain_lib.core.errors import RetrainError
from retrain_lib.core.processes import start_process, stop_process_groups
from retrain_lib.core.storage import S3Settings
from retrain_lib.devtools.local_stack import airflow_process_env

__all__ = [
    "COMPOSE_AIRFLOW_ENV",
    "DEFAULT_WORKERS",
    "ServiceStack",
    "Worker",
    "worker_hostname",
]

WORKER_NAME_ENV = "AUTORETRAIN_WORKER_NAME"
"""Set per worker process: the hostname its task instances record (see :func:`worker_hostname`)."""

COMPOSE_AIRFLOW_ENV = (
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK",
    "AUTORETRAIN_STORAGE",
    "AUTORETRAIN_S3_ENDPOINT_URL",
    "AUTORETRAIN_CONFIGS",
    "AUTORETRAIN_SCRATCH",
    "AUTORETRAIN_MLFLOW_UI_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
"""The environment docker-compose.yml gives every Airflow service (``x-airflow-common``)."""


def worker_hostname() -> str:
    """The hostname a task instance records: the worker's name where one host runs several
    workers (``$AUTORETRAIN_WORKER_NAME``), else the host's. Airflow calls it through
    ``[core] hostname_callable``."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


@dataclass(frozen=True)
class Worker:
    """One Celery worker: its name (``--celery-hostname``) and the queues it serves."""

    name: str
    queues: tuple[str, ...]
    concurrency: int = 4


DEFAULT_WORKERS = (Worker("general", ("default",)), Worker("trainer", ("default", "train")))
"""One worker for everything but training, one that also serves the ``train`` queue."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str, timeout_s: float = 5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except (OSError, urllib.error.HTTPError):
        return False


@dataclass
class ServiceStack:
    """Airflow with the CeleryExecutor and an MLflow server, as native processes under ``root``.

    Args:
        root: Folder for ``AIRFLOW_HOME``, logs and scratch.
        airflow_db_url: Airflow's metadata database (SQLAlchemy URL, PostgreSQL).
        mlflow_backend_uri: MLflow's backend store (PostgreSQL).
        redis_url: The Celery broker, ``redis://host:port/db``.
        storage_uri: ``s3://bucket/prefix``: what the tasks use.
        s3: How the services reach the S3 server.
        mlflow_artifacts: Where the MLflow server stores artifacts (``s3://bucket/prefix``).
        configs_dir, dags_folder, plugins_folder: The project's folders.
        workers: The Celery workers and their queues.
        pools: Airflow pools to create, name to slots (``runner.pool``).
        extra_env: More variables for every Airflow process (e.g. shorter timeouts in tests).
    """

    root: Path
    airflow_db_url: str
    mlflow_backend_uri: str
    redis_url: str
    storage_uri: str
    s3: S3Settings
    mlflow_artifacts: str
    configs_dir: Path
    dags_folder: Path
    plugins_folder: Path
    workers: tuple[Worker, ...] = DEFAULT_WORKERS
    pools: Mapping[str, int] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print
    api_port: int = field(default_factory=_free_port)
    mlflow_port: int = field(default_factory=_free_port)
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    _jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _token: str | None = None

    # ------------------------------------------------------------------ settings

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def airflow_environment(self) -> dict[str, str]:
        """What every Airflow process gets: compose's ``x-airflow-common`` environment
        (:data:`COMPOSE_AIRFLOW_ENV`), plus the paths and ports of processes that share one
        host instead of one container each."""
        public, private = self.s3.environment()
        passwords = self.airflow_home / "passwords.json"
        env = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.airflow_db_url,
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.airflow_db_url}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
            "AUTORETRAIN_STORAGE": self.storage_uri,
            "AUTORETRAIN_S3_ENDPOINT_URL": public.get("AUTORETRAIN_S3_ENDPOINT_URL", ""),
            "AUTORETRAIN_CONFIGS": str(self.configs_dir),
            "AUTORETRAIN_SCRATCH": str(self.root / "scratch"),
            "AUTORETRAIN_MLFLOW_UI_URL": self.mlflow_url,
            "AWS_DEFAULT_REGION": public.get("AWS_DEFAULT_REGION", "us-east-1"),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": public.get("MLFLOW_S3_ENDPOINT_URL", ""),
            **private,
            # One host, several services: paths and ports a container would not need.
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(_free_port()),
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def process_env(self, **more: str) -> dict[str, str]:
        """This process's environment without its own Airflow settings, with the stack's."""
        return airflow_process_env({**self.airflow_environment(), **more})

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, command: list[str], env: Mapping[str, str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            self._procs[name] = start_process(command, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, cwd=self.root)

    def airflow(self, *args: str, timeout_s: float = 600) -> str:
        """Run an ``airflow`` CLI command against the stack; its output."""
        proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.process_env(),
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              cwd=self.root)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise RetrainError(f"'airflow {' '.join(args)}' failed ({proc.returncode}):\n{tail}")
        return proc.stdout

    def start(self, timeout_s: float = 300) -> None:
        """Start MLflow and Airflow and wait until both answer."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        (self.airflow_home / "passwords.json").write_text(
            json.dumps({"admin": self.admin_password}))
        public, private = self.s3.environment()
        mlflow = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                  str(self.mlflow_port), "--workers", "1", "--backend-store-uri",
                  self.mlflow_backend_uri, "--artifacts-destination", self.mlflow_artifacts]
        self._start("mlflow", mlflow, {**os.environ, **public, **private})
        self.log("migrating the Airflow metadata database")
        self.airflow("db", "migrate")
        for pool, slots in self.pools.items():
            self.airflow("pools", "set", pool, str(slots), f"AutoRetrain pool {pool}")
        env = self.process_env()
        for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self._start(component, [sys.executable, "-m", "airflow", component], env)
        for worker in self.workers:
            self.start_worker(worker.name)
        deadline = time.monotonic() + timeout_s
        for name, url in (("mlflow", f"{self.mlflow_url}/health"),
                          ("api-server", f"{self.api_url}/api/v2/monitor/health")):
            while not _answers(url):
                proc = self._procs[name]
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RetrainError(f"{name} did not start (exit code {proc.poll()}); see "
                                       f"{self.logs / f'{name}.log'}")
                time.sleep(1)
        self.log(f"Airflow {self.api_url}, MLflow {self.mlflow_url}; logs in {self.logs}")

    def start_worker(self, name: str) -> None:
        """Start (or start again) the Celery worker ``name``."""
        [worker] = [w for w in self.workers if w.name == name]
        command = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname",
                   worker.name, "--queues", ",".join(worker.queues), "--concurrency",
                   str(worker.concurrency), "--skip-serve-logs"]
        self._start(f"worker-{worker.name}", command,
                    self.process_env(**{WORKER_NAME_ENV: worker.name}))

    def worker_process(self, name: str) -> subprocess.Popen[bytes]:
        """The process of the Celery worker ``name``."""
        return self._procs[f"worker-{name}"]

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and everything it started at once, as a lost machine would; the
        pids it had."""
        import psutil

        proc = self.worker_process(name)
        try:
            tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = [proc.pid]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        return tree

    def stop(self) -> None:
        """Stop every process of the stack, side by side (SIGTERM, SIGKILL after 20 s)."""
        stop_process_groups(list(self._procs.values()), grace_s=20)
        self._procs.clear()

    def __enter__(self) -> ServiceStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the REST API

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call Airflow's REST API as the admin user; the decoded JSON answer."""
        if self._token is None:
            self._token = self._request("POST", "/auth/token", {
                "username": "admin", "password": self.admin_password}, token=None)["access_token"]
        return self._request(method, path, body, token=self._token)

    def _request(self, method: str, path: str, body: Any, token: str | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise RetrainError(f"Airflow API {method} {path}: HTTP {exc.code}: "
                               f"{exc.read()[:500].decode(errors='replace')}") from None
        return json.loads(raw) if raw else None

    def wait_for_dags(self, dag_ids: set[str], timeout_s: float = 300) -> None:
        """Wait until the dag-processor has parsed ``dag_ids``."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {d["dag_id"] for d in self.api("GET", "/api/v2/dags?limit=100")["dags"]}
            if dag_ids <= seen:
                return
            if time.monotonic() > deadline:
                raise RetrainError(f"DAGs {sorted(dag_ids - seen)} not parsed after "
                                   f"{timeout_s:.0f} s; see {self.logs / 'dag-processor.log'}")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.api(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]
        return runs

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        from urllib.parse import quote

        tis: list[dict[str, Any]] = self.api(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
            "?limit=200")["task_instances"]
        return tis

    def wait_for_run(self, dag_id: str, *, where: Callable[[dict[str, Any]], bool] | None = None,
                     timeout_s: float = 900, on_wait: Callable[[], None] | None = None
                     ) -> dict[str, Any]:
        """Wait until a run of ``dag_id`` (the first that ``where`` accepts) has finished."""
        deadline = time.monotonic() + timeout_s
        while True:
            runs = [r for r in self.dag_runs(dag_id) if where is None or where(r)]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            if done:
                return done[0]
            for name, proc in self._procs.items():
                if proc.poll() is not None and not name.startswith("worker"):
                    raise RetrainError(f"{name} exited with code {proc.returncode}; see "
                                       f"{self.logs / f'{name}.log'}")
            if time.monotonic() > deadline:
                raise RetrainError(f"no finished run of {dag_id} after {timeout_s:.0f} s "
                                   f"(runs: {[(r['dag_run_id'], r['state']) for r in runs]})")
            if on_wait is not None:
                on_wait()
            time.sleep(2)


@contextlib.contextmanager
def service_stack(**kwargs: Any) -> Iterator[ServiceStack]:
    """A started :class:`ServiceStack`, stopped at the end."""
    with ServiceStack(**kwargs) as stack:
        yield stack
