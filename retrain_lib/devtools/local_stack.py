"""The local Airflow + MLflow stack under one folder: what the demo runs its cycles on and
what ``autoretrain up`` serves.

Airflow reads its settings from the environment of each process started here, so nothing here
imports Airflow, and a caller's own Airflow settings are never touched. Every process started
here is stopped with its whole process group when the caller is stopped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrain_lib.core.errors import ConfigError, RetrainError
from retrain_lib.core.processes import start_process, stop_process_group, stop_process_groups
from retrain_lib.core.storage import S3Settings, Storage, open_storage
from retrain_lib.cycle.settings import run_cycle_id

__all__ = [
    "TASK_STARTED",
    "DagRunOutcome",
    "LocalStack",
    "airflow_process_env",
    "project_folders",
    "run_up",
    "up_stack",
]

TASK_STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\w+) map_index=(-?\d+)")
_FINISHED = re.compile(r"DagRun Finished: .*?run_id=([^,]+), .*?state=(\w+)")
_FAILED_TASK = re.compile(r"(?:AirflowFailException|AirflowException): (.+?)(?: \[|$)")


def project_folders() -> tuple[Path, Path, Path]:
    """The checkout's ``dags/``, ``plugins/`` and ``configs/object_types/`` folders."""
    root = Path(__file__).resolve().parents[2]
    folders = (root / "dags", root / "plugins", root / "configs" / "object_types")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not found; the demo and 'autoretrain up' run "
                          "from a checkout of the project (pip install -e .)")
    return folders


@dataclass(frozen=True)
class DagRunOutcome:
    """One finished ``airflow dags test`` run."""

    dag_id: str
    run_id: str
    logical_date: datetime
    state: str
    seconds: float
    log: Path
    tasks_started: tuple[str, ...] = ()
    error: str = ""

    @property
    def cycle_id(self) -> str:
        """The cycle id the tasks of this run used (see
        :func:`retrain_lib.cycle.settings.run_cycle_id`)."""
        return run_cycle_id(self.run_id, self.logical_date)


@dataclass(frozen=True)
class LocalStack:
    """Airflow (SQLite or a given database), MLflow and storage, by default under one folder.

    ``storage`` may name an S3 root (``s3://bucket/prefix``, reached with ``s3``) and
    ``mlflow_uri`` a tracking server, as the compose stack has them; by default both live
    under ``root``. Airflow reads its settings from the environment of each process this
    starts, so nothing here imports Airflow, and a caller's own Airflow settings are never
    touched.
    """

    root: Path
    dags_folder: Path
    plugins_folder: Path
    configs_dir: Path
    database_url: str | None = None
    task_retries: int | None = None
    task_retry_delay_s: float | None = None
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    storage: str | None = None
    s3: S3Settings | None = None
    mlflow_uri: str | None = None

    @property
    def airflow_home(self) -> Path:
        """``AIRFLOW_HOME`` of this stack."""
        return self.root / "airflow"

    @property
    def storage_root(self) -> Path:
        """The storage root, when it is a local directory.

        Raises:
            ConfigError: the storage is on S3 (use :meth:`open_storage`).
        """
        if self.storage is None:
            return self.root / "storage"
        if self.storage.startswith("s3://"):
            raise ConfigError(f"the stack's storage is {self.storage}, not a local folder")
        return Path(self.storage)

    @property
    def storage_uri(self) -> str:
        """The storage root the tasks use: a local folder or ``s3://bucket/prefix``."""
        return self.storage if self.storage is not None else str(self.root / "storage")

    def open_storage(self) -> Storage:
        """The stack's storage, as the tasks see it."""
        return open_storage(self.storage_uri, s3=self.s3)

    @property
    def tracking_uri(self) -> str:
        """MLflow's tracking URI: the given server, else a SQLite file under ``root``."""
        return self.mlflow_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def metadata_url(self) -> str:
        """Airflow's metadata database."""
        return self.database_url or f"sqlite:///{self.airflow_home / 'airflow.db'}"

    def environment(self) -> dict[str, str]:
        """The variables that point Airflow, MLflow and retrain_lib at this stack."""
        env = {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AUTORETRAIN_CONFIGS": str(self.configs_dir),
            "AUTORETRAIN_STORAGE": self.storage_uri,
            "AUTORETRAIN_SCRATCH": str(self.root / "scratch"),
            "AUTORETRAIN_MLFLOW_UI_URL": self.mlflow_ui_url,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PYTHONUNBUFFERED": "1",
        }
        if self.s3 is not None:
            public, private = self.s3.environment()
            env.update(public)
            env.update(private)
        env.update(self.extra_env)
        if self.task_retries is not None:
            env["AUTORETRAIN_TASK_RETRIES"] = str(self.task_retries)
        if self.task_retry_delay_s is not None:
            env["AUTORETRAIN_TASK_RETRY_DELAY_S"] = str(self.task_retry_delay_s)
        return env

    def process_env(self) -> dict[str, str]:
        """This process's environment with the stack's settings on top."""
        return airflow_process_env(self.environment())

    def airflow(self, *args: str, check: bool = True, timeout_s: float | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run an ``airflow`` CLI command against this stack; output captured."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.process_env(),
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RetrainError(f"'airflow {' '.join(args)}' failed with exit code "
                               f"{proc.returncode}:\n{tail}")
        return proc

    def migrate(self) -> None:
        """Create or upgrade the Airflow metadata database."""
        self.airflow("db", "migrate")

    def run_dag(self, dag_id: str, *, conf: Mapping[str, Any] | None = None,
                logical_date: datetime | None = None, log_dir: Path | None = None,
                on_line: Callable[[str], None] | None = None) -> DagRunOutcome:
        """Run one DAG run with ``airflow dags test`` (Airflow's ``dag.test()``).

        The whole output goes to ``<log_dir>/<dag_id>-<time>.log``; ``on_line`` sees every
        line as it comes. A failed run is returned (``state='failed'``), not raised.
        """
        logical_date = logical_date or datetime.now(UTC)
        log_dir = log_dir or self.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / (f"{dag_id}-{logical_date.strftime('%Y%m%dT%H%M%S')}-run"
                              f"{datetime.now(UTC).strftime('%H%M%S%f')}.log")
        command = [sys.executable, "-m", "airflow", "dags", "test", dag_id,
                   logical_date.isoformat()]
        if conf:
            command += ["--conf", json.dumps(dict(conf))]
        started = time.monotonic()
        run_id, state, error = "", "", ""
        tasks: list[str] = []
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = start_process(command, env=self.process_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log_file.write(line)
                    if (found := TASK_STARTED.search(line)) and found.group(1) not in tasks:
                        tasks.append(found.group(1))
                    if found := _FINISHED.search(line):
                        run_id, state = found.group(1), found.group(2)
                    if "AirflowFailException" in line or "Task failed with exception" in line:
                        error = error or _error_text(line)
                    if on_line is not None:
                        on_line(line)
                code = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM: the run's tasks and trainings stop too
                stop_process_group(proc)
                raise
        if not state:
            state = "success" if code == 0 else "failed"
        if code != 0 and state != "failed":
            state = "failed"
        if not run_id:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise RetrainError(f"'airflow dags test {dag_id}' ran no DAG run (exit code "
                               f"{code}); the last lines of {log_path}:\n{tail}")
        return DagRunOutcome(dag_id, run_id, logical_date, state,
                             round(time.monotonic() - started, 1), log_path, tuple(tasks), error)


def airflow_process_env(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of an Airflow process started from here: this process's, without its
    own Airflow settings (they never leak into a stack), with ``settings`` on top."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
    # `airflow standalone` starts its components as `airflow ...`: find this environment's.
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, **settings}


def _error_text(line: str) -> str:
    found = _FAILED_TASK.search(line)
    return found.group(1).strip() if found else ""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def up_stack(root: str | Path, *, configs: str | Path | None = None, airflow_port: int = 8080,
             mlflow_port: int = 5000) -> LocalStack:
    """The stack ``autoretrain up`` serves: the demo's folder, and its configs if it has them."""
    root = Path(root).expanduser().resolve()
    dags, plugins, shipped = project_folders()
    configs_dir = Path(configs) if configs else (
        root / "configs" if (root / "configs").is_dir() else shipped)
    return LocalStack(
        root=root, dags_folder=dags, plugins_folder=plugins, configs_dir=configs_dir.resolve(),
        mlflow_ui_url=f"http://127.0.0.1:{mlflow_port}",
        extra_env={"AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(airflow_port),
                   # A local, single-user stack: no login page.
                   "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"})


def run_up(root: str | Path, *, configs: str | Path | None = None, airflow_port: int = 8080,
           mlflow_port: int = 5000, log: Callable[[str], None] = print,
           ready_timeout_s: float = 300,
           on_ready: Callable[[LocalStack], None] | None = None) -> LocalStack:
    """Serve Airflow (``airflow standalone``) and the MLflow UI until Ctrl-C.

    Both use the stack of :func:`up_stack`; their output goes to ``<root>/logs/``. With
    ``on_ready``, it is called once both answer and both stop when it returns (for tests and
    scripts).

    Raises:
        ConfigError: a port is taken.
        RetrainError: a server exited or did not answer within ``ready_timeout_s``.
    """
    stack = up_stack(root, configs=configs, airflow_port=airflow_port, mlflow_port=mlflow_port)
    for port in (airflow_port, mlflow_port):
        if _port_open(port):
            raise ConfigError(f"port {port} on 127.0.0.1 is already in use; stop what holds it "
                              "or choose another with --airflow-port / --mlflow-port")
    logs = stack.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"Airflow home {stack.airflow_home}; DAGs from {stack.dags_folder} for the configs in "
        f"{stack.configs_dir}; storage {stack.storage_root}")
    stack.migrate()
    commands = {
        "mlflow": [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                   stack.tracking_uri, "--artifacts-destination",
                   str(stack.root / "mlartifacts"), "--host", "127.0.0.1", "--port",
                   str(mlflow_port)],
        "airflow": [sys.executable, "-m", "airflow", "standalone"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}-up.log", "ab") as out:
                procs[name] = start_process(command, env=stack.process_env(), stdout=out,
                                            stderr=subprocess.STDOUT, cwd=stack.root)
        deadline = time.monotonic() + ready_timeout_s
        waiting = {"airflow": airflow_port, "mlflow": mlflow_port}
        while waiting:
            for name, port in list(waiting.items()):
                if procs[name].poll() is not None:
                    raise RetrainError(f"{name} exited with code {procs[name].returncode}; see "
                                       f"{logs / f'{name}-up.log'}")
                if _port_open(port):
                    log(f"{name} answers on http://127.0.0.1:{port}")
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise RetrainError(f"{', '.join(waiting)} did not answer within "
                                   f"{ready_timeout_s:.0f} s; see {logs}")
            time.sleep(1)
        log(f"Airflow UI  http://127.0.0.1:{airflow_port}  (no login: a local, single-user "
            "stack; DAGs start paused, toggle them on)")
        log(f"MLflow UI   http://127.0.0.1:{mlflow_port}")
        log(f"logs        {logs}/airflow-up.log, {logs}/mlflow-up.log; Ctrl-C stops both")
        if on_ready is not None:
            on_ready(stack)
        while on_ready is None:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RetrainError(f"{name} exited with code {proc.returncode}; see "
                                       f"{logs / f'{name}-up.log'}")
            time.sleep(2)
    finally:
        stop_process_groups(list(procs.values()))
    return stack
