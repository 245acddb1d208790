"""The Docker runner: the training entrypoint in the trainer image, on a local or remote
Docker host, through the Docker SDK.

The container gets the request as arguments, S3 and MLflow access as environment (secrets
never appear in logs), a named scratch volume (so a retry on the same host resumes from the
last checkpoint), the configured bind mounts, and GPUs through a device request. Its output
is streamed into the logger; its exit code comes from the Docker API. When this process is
stopped (a killed task, Ctrl-C), the container is stopped and removed too.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from retrain_lib.core.config import DockerRunnerConfig
from retrain_lib.core.errors import ConfigError, TrainingFailed
from retrain_lib.training.contract import (
    CONTAINER_IMAGE_ENV,
    TrainRequest,
    TrainResult,
    parse_result_line,
)
from retrain_lib.training.runners.environment import (
    LOG_TAIL_LINES,
    TrainingEnvironment,
    failure,
    stream_lines,
)

__all__ = ["CONTAINER_SCRATCH", "ContainerSpec", "DockerRunner"]

log = logging.getLogger(__name__)

CONTAINER_SCRATCH = "/scratch"
"""Where the scratch volume is mounted in the trainer container (resumption lives there)."""
STOP_GRACE_S = 30


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the Docker API is given to start one training container."""

    image: str
    command: list[str]
    environment: dict[str, str]
    mounts: list[dict[str, Any]]
    labels: dict[str, str]
    network_mode: str | None = None
    shm_size: str | None = None
    gpus: int = 0
    entrypoint: list[str] | None = None
    read_only_root: bool = True


class DockerRunner:
    """Runs the entrypoint in the trainer image on the configured Docker host."""

    def __init__(self, config: DockerRunnerConfig, *,
                 environment: TrainingEnvironment | None = None,
                 scratch_volume: str = "autoretrain-scratch",
                 entrypoint: list[str] | None = None, timeout_s: int = 120,
                 logger: logging.Logger | None = None) -> None:
        """Args:
        config: Image, Docker host, GPUs, network, mounts.
        environment: S3 and MLflow access for the container (default: this process's
            S3 and MLflow variables).
        scratch_volume: Named Docker volume mounted at /scratch.
        entrypoint: Override the image's ENTRYPOINT (default: keep it).
        timeout_s: Docker API timeout in seconds.
        logger: Where each output line goes (default: this module's logger).
        """
        self.config = config
        self.environment = environment
        self.scratch_volume = scratch_volume
        self.entrypoint = list(entrypoint) if entrypoint else None
        self.timeout_s = timeout_s
        self.logger = logger or log

    def spec(self, request: TrainRequest, *, fresh: bool = False) -> ContainerSpec:
        """The container that runs ``request`` (scratch on the mounted volume).

        Raises:
            ConfigError: a CUDA device is requested but the runner asks for no GPU.
        """
        if self.config.gpus == 0 and request.device != "cpu":
            raise ConfigError(f"device {request.device!r} needs a GPU but the docker runner "
                              "requests none (runner.docker.gpus: 0); set gpus or device: cpu")
        if self.config.gpus > 0 and request.device == "cpu":
            self.logger.warning("the container gets %d GPU(s) but training runs on the CPU "
                                "(training.device: cpu)", self.config.gpus)
        environment = self.environment or TrainingEnvironment.from_process()
        mounts = [{"Target": CONTAINER_SCRATCH, "Source": self.scratch_volume,
                   "Type": "volume", "ReadOnly": False}]
        for mount in self.config.extra_mounts:
            parts = mount.split(":")
            mounts.append({"Target": parts[1], "Source": parts[0], "Type": "bind",
                           "ReadOnly": len(parts) == 3 and parts[2] == "ro"})
        in_container = environment.request_for_child(request).model_copy(
            update={"scratch": CONTAINER_SCRATCH})
        return ContainerSpec(
            image=self.config.image,
            command=[*in_container.to_argv(), *(["--fresh"] if fresh else [])],
            environment={**environment.public, **environment.private,
                         "PYTHONUNBUFFERED": "1",
                         **({"HOME": "/tmp"} if self.config.read_only_root else {})},
            mounts=mounts,
            labels={"autoretrain.request": request.identity()[:20],
                    "autoretrain.object_type": request.object_type or ""},
            network_mode=self.config.network_mode, shm_size=self.config.shm_size,
            gpus=self.config.gpus, entrypoint=self.entrypoint,
            read_only_root=self.config.read_only_root)

    def run(self, request: TrainRequest, *, fresh: bool = False) -> TrainResult:
        """Run the training container to its end and return its result.

        Raises:
            ConfigError: the Docker host address is malformed, or the image is missing.
            TrainingFailed: the Docker host cannot be reached or was lost mid-training, or
                the container exited non-zero or printed no result (all worth a retry).
        """
        import docker.errors
        import requests
        import urllib3

        # What a lost connection to the Docker host raises, in the log stream or the wait.
        lost = (docker.errors.DockerException, requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError, OSError)
        spec = self.spec(request, fresh=fresh)
        client = self._client()
        self._ensure_image(client)
        # The image id pins what ran, whatever the tag names later (recorded on the MLflow run).
        with contextlib.suppress(docker.errors.DockerException, *lost):
            image_id = client.images.get(spec.image).id
            spec = replace(spec, environment={**spec.environment,
                                              CONTAINER_IMAGE_ENV: f"{spec.image}@{image_id}"})
        # A container of this request from an attempt that lost the Docker host is still
        # there (running, if only the connection was lost): never two trainings of one request.
        for leftover in client.containers.list(all=True, filters={
                "label": f"autoretrain.request={spec.labels['autoretrain.request']}"}):
            self.logger.warning("removing container %s, left by an earlier attempt of this "
                                "training", leftover.short_id)
            leftover.remove(force=True)
        self.logger.info("starting training container from %s on %s: %s", spec.image,
                         self.config.docker_url, " ".join(spec.command))
        try:
            container = client.containers.run(**self._run_arguments(spec), detach=True)
        except docker.errors.APIError as exc:
            raise TrainingFailed(f"the Docker host {self.config.docker_url} could not start "
                                 f"the training container from {spec.image!r}: "
                                 f"{exc.explanation or exc}") from None
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        try:
            for line in stream_lines(container.logs(stream=True, follow=True)):
                self.logger.info("%s", line)
                tail.append(line)
            code = int(container.wait().get("StatusCode", 1))
        except lost as exc:
            raise TrainingFailed(
                f"lost the Docker host {self.config.docker_url} during the training ({exc}); "
                "a retry starts the training again (from its last checkpoint) once the host "
                "answers") from None
        except BaseException:
            # Task killed or timed out: stop the container rather than orphan it.
            with contextlib.suppress(Exception):
                container.stop(timeout=STOP_GRACE_S)
            raise
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        if code != 0:
            raise failure("training container", code, list(tail))
        return parse_result_line(list(tail))

    def _client(self) -> Any:
        from docker.utils import parse_host

        import docker

        try:
            parse_host(self.config.docker_url)
        except Exception as exc:  # DockerException and URL errors alike
            raise ConfigError(f"runner.docker.docker_url {self.config.docker_url!r} is not a "
                              f"usable Docker host address ({exc})") from None
        try:
            client = docker.DockerClient(base_url=self.config.docker_url,
                                         timeout=self.timeout_s)
            client.ping()
        except Exception as exc:  # the daemon is down, restarting or unreachable
            raise TrainingFailed(
                f"Docker daemon at {self.config.docker_url} cannot be reached ({exc}); check "
                "that it runs and runner.docker.docker_url (a retry tries again)") from None
        return client

    def _ensure_image(self, client: Any) -> None:
        import docker.errors

        try:
            client.images.get(self.config.image)
            return
        except docker.errors.ImageNotFound:
            pass
        self.logger.info("image %s is not on the Docker host; trying to pull it",
                         self.config.image)
        try:
            client.images.pull(self.config.image)
        except docker.errors.DockerException as exc:
            raise ConfigError(
                f"trainer image {self.config.image!r} is missing: it is not on the Docker host "
                f"{self.config.docker_url} and could not be pulled ({exc}). Build it with "
                f"'docker build -f docker/trainer.Dockerfile -t {self.config.image} .' on that "
                "host, or push it to a registry the host can reach") from None

    @staticmethod
    def _run_arguments(spec: ContainerSpec) -> dict[str, Any]:
        from docker.types import DeviceRequest, Mount

        arguments: dict[str, Any] = {
            "image": spec.image, "command": spec.command, "environment": spec.environment,
            "mounts": [Mount(target=m["Target"], source=m["Source"], type=m["Type"],
                             read_only=m["ReadOnly"]) for m in spec.mounts],
            "labels": spec.labels, "network_mode": spec.network_mode,
            "shm_size": spec.shm_size,
        }
        if spec.read_only_root:
            # Caches and configs (Ultralytics', matplotlib's, $HOME's) go to memory.
            arguments["read_only"] = True
            arguments["tmpfs"] = {"/tmp": "rw,nosuid,nodev,mode=1777"}
        if spec.entrypoint:
            arguments["entrypoint"] = spec.entrypoint
        if spec.gpus > 0:
            arguments["device_requests"] = [DeviceRequest(count=spec.gpus,
                                                          capabilities=[["gpu"]])]
        return arguments
