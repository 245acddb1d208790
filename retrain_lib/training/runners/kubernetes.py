"""The kubernetes runner: the training entrypoint in the trainer image, as one Kubernetes pod.

This module renders the pod (a plain manifest, testable without a cluster or Airflow); the
Airflow layer (:mod:`retrain_lib.airflow.kubernetes`) hands it to a KubernetesPodOperator,
which starts it, streams its log into the task log and reads the result the entrypoint
writes to ``/airflow/xcom/return.json`` (the same result JSON it prints last).

The pod runs as a non-root user on a read-only root filesystem; its only writable places are
``/tmp``, ``/scratch`` and ``/dev/shm``. It gets the endpoints (S3, MLflow) as plain
environment variables and every credential from the Kubernetes Secrets the config names:
keys and passwords never appear in the pod spec, the config or the task log.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from retrain_lib.core.config import KubernetesRunnerConfig
from retrain_lib.core.errors import ConfigError
from retrain_lib.training.contract import CONTAINER_IMAGE_ENV, TrainRequest, TrainResult
from retrain_lib.training.runners.environment import TrainingEnvironment

__all__ = [
    "CONTAINER_NAME",
    "POD_RESULT_FILE",
    "PodLauncher",
    "pod_manifest",
    "run_in_pod",
]

CONTAINER_NAME = "base"
"""The KubernetesPodOperator reads logs and the result of the container with this name."""
POD_RESULT_FILE = "/airflow/xcom/return.json"
POD_SCRATCH = "/scratch"
TRAINER_UID = 1000  # the trainer image's user (docker/trainer.Dockerfile)

PodLauncher = Callable[[dict[str, Any]], Mapping[str, Any]]
"""Starts a pod manifest, waits for it, and returns the JSON its container wrote to
:data:`POD_RESULT_FILE` (inside Airflow: :func:`retrain_lib.airflow.kubernetes.pod_launcher`)."""

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")


def _label(value: str) -> str:
    """A valid label value: at most 63 characters, alphanumeric at both ends."""
    return _LABEL_VALUE.sub("-", value)[:63].strip("-_.")


def _public_environment(environment: TrainingEnvironment) -> dict[str, str]:
    """What the pod may carry in its spec: endpoints and region, and the tracking URI when it
    embeds no credentials. Keys and passwords must come from the config's Secrets."""
    env = dict(environment.public)
    uri = environment.private.get("MLFLOW_TRACKING_URI")
    if uri:
        if urlsplit(uri).password or urlsplit(uri).username:
            raise ConfigError("the MLflow tracking URI embeds credentials, which a pod spec "
                              "must not hold: put MLFLOW_TRACKING_URI (or the user and "
                              "password) in a Kubernetes Secret named in "
                              "runner.kubernetes.secrets")
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def pod_manifest(config: KubernetesRunnerConfig, request: TrainRequest, *,
                 environment: TrainingEnvironment | None = None, fresh: bool = False
                 ) -> dict[str, Any]:
    """The pod (a ``v1`` Pod manifest) that runs ``request`` to its end.

    Raises:
        ConfigError: a CUDA device is asked for without GPUs, or a credential would have to
            go into the pod spec.
    """
    if config.gpus == 0 and request.device != "cpu":
        raise ConfigError(f"device {request.device!r} needs a GPU but the kubernetes runner "
                          "requests none (runner.kubernetes.gpus: 0); set gpus or device: cpu")
    environment = environment or TrainingEnvironment.from_process()
    # The root filesystem is read-only: caches that default to $HOME go to /tmp.
    env = {**_public_environment(environment), "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
           CONTAINER_IMAGE_ENV: config.image}
    in_pod = request.model_copy(update={"scratch": POD_SCRATCH, "mlflow_uri": None})
    identity = request.identity()
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if config.cpu:
        requests["cpu"] = config.cpu
    if config.memory:
        requests["memory"] = limits["memory"] = config.memory
    if config.gpus:
        limits["nvidia.com/gpu"] = str(config.gpus)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    scratch: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": config.scratch_claim}}
        if config.scratch_claim else {"emptyDir": {}})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        # The image's ENTRYPOINT is the training entrypoint; these are its arguments.
        "args": [*in_pod.to_argv(), "--result-file", POD_RESULT_FILE,
                 *(["--fresh"] if fresh else [])],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "envFrom": [{"secretRef": {"name": name}} for name in config.secrets],
        "resources": resources,
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID,
                            "runAsGroup": TRAINER_UID, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "scratch", "mountPath": POD_SCRATCH},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if not container["envFrom"]:
        del container["envFrom"]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # Airflow's task retries retry a training, not the kubelet
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID,
                            "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}},
                    {"name": "scratch", **scratch},
                    {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                  "sizeLimit": config.shm_size}}],
    }
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in config.tolerations]
    if config.service_account_name:
        spec["serviceAccountName"] = config.service_account_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"autoretrain-train-{identity[:12]}",
            "namespace": config.namespace,
            "labels": {"app.kubernetes.io/name": "autoretrain-trainer",
                       "app.kubernetes.io/component": "training",
                       "autoretrain/request": identity[:20],
                       "autoretrain/object-type": _label(request.object_type or "none"),
                       "autoretrain/cycle": _label(request.cycle_id or "none")},
        },
        "spec": spec,
    }


def run_in_pod(config: KubernetesRunnerConfig, request: TrainRequest, launch: PodLauncher, *,
               environment: TrainingEnvironment | None = None, fresh: bool = False
               ) -> TrainResult:
    """Run ``request`` in a pod through ``launch`` and return the result it wrote."""
    result = launch(pod_manifest(config, request, environment=environment, fresh=fresh))
    return TrainResult.from_dict(result)
