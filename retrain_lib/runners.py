"""How a training runs: a local subprocess, or a container started by Airflow's DockerOperator.

Both run the same entrypoint (``python -m retrain_lib.train``) with the same arguments
(:meth:`TrainRequest.to_argv`) and read its last output line back as a :class:`TrainResult`.

* ``local`` — a child process on this host, the embedded default. Its output is streamed line
  by line into a logger (the task log when it runs in an Airflow task); a non-zero exit raises
  :class:`TrainingFailed` carrying the last lines.
* ``docker`` — :class:`airflow.providers.docker.operators.docker.DockerOperator`, built from
  :class:`retrain_lib.config.DockerRunnerConfig`. MLflow and S3 endpoints and credentials come
  from Airflow connections and variables (or the worker's environment), never from code.

Airflow is imported inside the Docker functions only, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain_lib.config import DockerRunnerConfig, RunnerConfig
from retrain_lib.errors import ConfigError, TrainingFailed
from retrain_lib.train import TrainRequest, TrainResult, parse_result_line

if TYPE_CHECKING:
    from airflow.providers.docker.operators.docker import DockerOperator

__all__ = [
    "CONTAINER_SCRATCH",
    "ENV_MLFLOW_CONN_ID",
    "MLFLOW_URI_VARIABLE",
    "DockerRunner",
    "LocalRunner",
    "run_training",
]

log = logging.getLogger(__name__)

CONTAINER_SCRATCH = "/scratch"
"""Where the scratch volume is mounted in the trainer container (resumption lives there)."""
ENV_MLFLOW_CONN_ID = "AUTORETRAIN_MLFLOW_CONN_ID"
"""Names an Airflow connection (host, port, schema, login, password) of the MLflow server."""
MLFLOW_URI_VARIABLE = "autoretrain_mlflow_tracking_uri"
"""Airflow variable with the MLflow tracking URI the container should use."""

_LOG_TAIL_LINES = 400


def _error_line(lines: Sequence[str]) -> str:
    """The entrypoint's one-line error message, if it printed one."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return ""


def _failure(what: str, code: int, lines: Sequence[str]) -> TrainingFailed:
    reason = _error_line(lines)
    kind = " (bad input or settings)" if code == 2 else ""
    message = f"{what} exited with code {code}{kind}"
    return TrainingFailed(f"{message}: {reason}" if reason else message, logs="\n".join(lines))


class LocalRunner:
    """Runs the entrypoint as a child process of this one."""

    def __init__(self, *, python: str | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, logger: logging.Logger | None = None) -> None:
        """Args:
        python: interpreter with retrain_lib installed (default: this one).
        env: environment of the child (default: this process's).
        cwd: working directory of the child (it writes nothing there).
        logger: where each output line goes (default: this module's logger).
        """
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.logger = logger or log

    def command(self, request: TrainRequest, *, fresh: bool = False) -> list[str]:
        """The command line this runner executes."""
        return [self.python, "-m", "retrain_lib.train", *request.to_argv(),
                *(["--fresh"] if fresh else [])]

    def run(self, request: TrainRequest, *, fresh: bool = False) -> TrainResult:
        """Train; stream the output; return the parsed result.

        Raises:
            TrainingFailed: the process exited non-zero or printed no result.
        """
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        self.logger.info("starting training: %s", " ".join(self.command(request, fresh=fresh)))
        tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        # Own session: on cancel the whole group (dataloader workers too) gets the signal.
        proc = subprocess.Popen(self.command(request, fresh=fresh), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                # Progress bars redraw with '\r'; each redraw becomes its own log line.
                for piece in raw.decode("utf-8", "replace").replace("\r", "\n").split("\n"):
                    piece = piece.rstrip()
                    if piece:
                        self.logger.info("%s", piece)
                        tail.append(piece)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        if code != 0:
            raise _failure("training process", code, list(tail))
        return parse_result_line(list(tail))


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the child's process group (it marks its MLflow run KILLED), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class DockerRunner:
    """Runs the entrypoint in the trainer image through Airflow's DockerOperator."""

    def __init__(self, config: DockerRunnerConfig, *, aws_conn_id: str | None = None,
                 mlflow_conn_id: str | None = None, scratch_volume: str = "autoretrain-scratch",
                 entrypoint: Sequence[str] | None = None, timeout_s: int = 120) -> None:
        """Args:
        config: image, Docker host, GPUs, network, mounts.
        aws_conn_id: Airflow 'aws' connection for S3 (default: $AUTORETRAIN_S3_CONN_ID; when
            neither is set, the worker's own AWS_* / AUTORETRAIN_S3_ENDPOINT_URL variables).
        mlflow_conn_id: Airflow connection of the MLflow server (default:
            $AUTORETRAIN_MLFLOW_CONN_ID); its login/password become MLflow credentials.
        scratch_volume: named Docker volume mounted at /scratch, so a retry on the same host
            resumes from the last checkpoint.
        entrypoint: override the image's ENTRYPOINT (default: keep it).
        timeout_s: Docker API timeout in seconds.
        """
        self.config = config
        self.aws_conn_id = aws_conn_id or os.environ.get("AUTORETRAIN_S3_CONN_ID")
        self.mlflow_conn_id = mlflow_conn_id or os.environ.get(ENV_MLFLOW_CONN_ID)
        self.scratch_volume = scratch_volume
        self.entrypoint = list(entrypoint) if entrypoint else None
        self.timeout_s = timeout_s

    def environment(self, request: TrainRequest) -> tuple[dict[str, str], dict[str, str]]:
        """(public, private) container environment; private values are masked in Airflow."""
        from retrain_lib.storage import S3Settings

        public = {"PYTHONUNBUFFERED": "1"}
        private: dict[str, str] = {}
        if self.aws_conn_id:
            s3 = S3Settings.from_airflow_connection(self.aws_conn_id)
        else:
            s3 = S3Settings.from_env()
            s3 = S3Settings(
                endpoint_url=s3.endpoint_url, region_name=os.environ.get("AWS_DEFAULT_REGION"),
                aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=os.environ.get("AWS_SESSION_TOKEN"))
        if s3.endpoint_url:
            public["AUTORETRAIN_S3_ENDPOINT_URL"] = s3.endpoint_url
            public["MLFLOW_S3_ENDPOINT_URL"] = s3.endpoint_url  # MLflow artifacts on S3 too
        if s3.region_name:
            public["AWS_DEFAULT_REGION"] = s3.region_name
        for name, value in (("AWS_ACCESS_KEY_ID", s3.aws_access_key_id),
                            ("AWS_SECRET_ACCESS_KEY", s3.aws_secret_access_key),
                            ("AWS_SESSION_TOKEN", s3.aws_session_token)):
            if value:
                private[name] = value
        uri, user, password = self._mlflow_settings(request)
        if uri:
            private["MLFLOW_TRACKING_URI"] = uri  # may embed credentials
        if user:
            private["MLFLOW_TRACKING_USERNAME"] = user
        if password:
            private["MLFLOW_TRACKING_PASSWORD"] = password
        return public, private

    def _mlflow_settings(self, request: TrainRequest) -> tuple[str | None, str | None, str | None]:
        uri = request.mlflow_uri
        user = password = None
        if self.mlflow_conn_id:
            from airflow.sdk import Connection

            try:
                conn = Connection.get(self.mlflow_conn_id)
            except Exception as exc:
                raise ConfigError(f"Airflow connection {self.mlflow_conn_id!r} (MLflow) is not "
                                  f"defined or unreadable ({exc})") from None
            if not uri and conn.host:
                scheme = conn.schema or conn.conn_type or "http"
                scheme = scheme if scheme in ("http", "https") else "http"
                host = conn.host if "://" in conn.host else f"{scheme}://{conn.host}"
                uri = f"{host}:{conn.port}" if conn.port else host
            user, password = conn.login or None, conn.password or None
        if not uri:
            from airflow.sdk import Variable

            uri = Variable.get(MLFLOW_URI_VARIABLE, default=None)
        return uri or os.environ.get("MLFLOW_TRACKING_URI"), user, password

    def container_request(self, request: TrainRequest) -> TrainRequest:
        """The request as the container sees it: scratch on the mounted volume."""
        return request.model_copy(update={"scratch": CONTAINER_SCRATCH})

    def _mounts(self) -> list[Any]:
        from docker.types import Mount

        mounts = [Mount(target=CONTAINER_SCRATCH, source=self.scratch_volume, type="volume")]
        for spec in self.config.extra_mounts:
            parts = spec.split(":")
            mounts.append(Mount(target=parts[1], source=parts[0], type="bind",
                                read_only=len(parts) == 3 and parts[2] == "ro"))
        return mounts

    def build_operator(self, request: TrainRequest, *, task_id: str = "train",
                       fresh: bool = False, **operator_kwargs: Any) -> DockerOperator:
        """A DockerOperator that runs this training; usable as a DAG task or executed inline.

        Its return value (XCom) is the entrypoint's last output line: the result JSON.
        """
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest

        if self.config.gpus == 0 and request.device != "cpu":
            raise ConfigError(f"device {request.device!r} needs a GPU but the docker runner "
                              "requests none (runner.docker.gpus: 0); set gpus or device: cpu")
        if self.config.gpus > 0 and request.device == "cpu":
            log.warning("the container gets %d GPU(s) but training runs on the CPU "
                        "(training.device: cpu)", self.config.gpus)
        public, private = self.environment(request)
        command = [*self.container_request(request).to_argv(), *(["--fresh"] if fresh else [])]
        devices = ([DeviceRequest(count=self.config.gpus, capabilities=[["gpu"]])]
                   if self.config.gpus > 0 else None)
        kwargs: dict[str, Any] = {
            "task_id": task_id,
            "image": self.config.image,
            "command": command,
            "entrypoint": self.entrypoint,
            "docker_url": self.config.docker_url,
            "environment": public,
            "private_environment": private,
            "mounts": self._mounts(),
            "mount_tmp_dir": False,  # remote Docker hosts cannot see the worker's temp dir
            "network_mode": self.config.network_mode,
            "shm_size": self.config.shm_size,
            "device_requests": devices,
            "auto_remove": "force",
            "xcom_all": False,
            "timeout": self.timeout_s,
            "labels": {"autoretrain.request": request.identity()[:20],
                       "autoretrain.object_type": request.object_type or ""},
        }
        kwargs.update(operator_kwargs)
        return DockerOperator(**kwargs)

    def ensure_image(self, operator: DockerOperator) -> None:
        """Fail with a clear message when the Docker host is down or the image is missing."""
        import docker.errors

        try:
            cli = operator.cli
        except Exception as exc:  # AirflowException or DockerException, both mean 'unreachable'
            raise ConfigError(f"Docker daemon at {self.config.docker_url} cannot be reached "
                              f"({exc}); check runner.docker.docker_url") from None
        try:
            cli.inspect_image(self.config.image)
            return
        except docker.errors.ImageNotFound:
            pass
        log.info("image %s is not on the Docker host; trying to pull it", self.config.image)
        try:
            cli.pull(self.config.image)
            cli.inspect_image(self.config.image)
        except docker.errors.DockerException as exc:
            raise ConfigError(
                f"trainer image {self.config.image!r} is missing: it is not on the Docker host "
                f"{self.config.docker_url} and could not be pulled ({exc}). Build it with "
                f"'docker build -f docker/trainer.Dockerfile -t {self.config.image} .' on that "
                "host, or push it to a registry the host can reach") from None

    def run(self, request: TrainRequest, context: Mapping[str, Any] | None = None, *,
            fresh: bool = False) -> TrainResult:
        """Run the container inline (e.g. inside a @task) and return its result.

        Raises:
            ConfigError: Docker host unreachable or image missing.
            TrainingFailed: the container exited non-zero or printed no result.
        """
        import docker.errors
        from airflow.providers.docker.exceptions import DockerContainerFailedException

        operator = self.build_operator(request, fresh=fresh, xcom_all=True)
        self.ensure_image(operator)
        try:
            lines = operator.execute(context=dict(context or {}))
        except DockerContainerFailedException as exc:
            logs = [str(line) for line in (exc.logs or [])][-_LOG_TAIL_LINES:]
            code = _exit_code(str(exc))
            raise _failure("training container", code, logs) from None
        except docker.errors.APIError as exc:
            raise TrainingFailed(f"the Docker host {self.config.docker_url} could not run the "
                                 f"training container from {self.config.image!r}: "
                                 f"{exc.explanation or exc}") from None
        except BaseException:
            # Task killed or timed out: stop the container rather than orphan it.
            with contextlib.suppress(Exception):
                operator.on_kill()
            raise
        if isinstance(lines, str):
            lines = [lines]
        return parse_result_line([str(line) for line in lines or []])


def _exit_code(message: str) -> int:
    import re

    found = re.search(r"'StatusCode': (\d+)", message)
    return int(found.group(1)) if found else 1


def run_training(request: TrainRequest, runner: RunnerConfig | None = None, *,
                 context: Mapping[str, Any] | None = None, fresh: bool = False,
                 logger: logging.Logger | None = None) -> TrainResult:
    """Run one training with the runner the object type's config names (default: local)."""
    runner = runner or RunnerConfig()
    if runner.kind == "docker":
        return DockerRunner(runner.docker).run(request, context, fresh=fresh)
    return LocalRunner(logger=logger).run(request, fresh=fresh)
