"""Where a training runs: a local child process, a container on a Docker host, or a pod on
Kubernetes (from an Airflow task, which launches it with the KubernetesPodOperator).

Every runner runs the same entrypoint (``python -m retrain_lib.training``) with the same
arguments (:meth:`~retrain_lib.training.contract.TrainRequest.to_argv`) and reads its last
output line back as a :class:`~retrain_lib.training.contract.TrainResult`. Airflow is not
needed: a runner works the same from a task, ``autoretrain cycle`` or a script.
"""

from __future__ import annotations

import logging

from retrain_lib.core.config import RunnerConfig
from retrain_lib.core.errors import ConfigError
from retrain_lib.training.contract import TrainRequest, TrainResult
from retrain_lib.training.runners.environment import TrainingEnvironment
from retrain_lib.training.runners.kubernetes import PodLauncher

__all__ = ["run_training"]


def run_training(request: TrainRequest, runner: RunnerConfig | None = None, *,
                 environment: TrainingEnvironment | None = None, fresh: bool = False,
                 logger: logging.Logger | None = None,
                 launch_pod: PodLauncher | None = None) -> TrainResult:
    """Run one training with the runner the object type's config names (default: local).

    Args:
        request: What to train.
        runner: The object type's runner settings.
        environment: S3 and MLflow access for the training (default: this process's
            environment).
        fresh: Discard an interrupted attempt instead of resuming it.
        logger: Where the training's output lines go (default: the runner's logger).
        launch_pod: How the kubernetes runner starts its pod (inside Airflow: the
            KubernetesPodOperator).

    Raises:
        ConfigError: the kubernetes runner is asked for where nothing can launch a pod.
    """
    runner = runner or RunnerConfig()
    if runner.kind == "kubernetes":
        if launch_pod is None:
            raise ConfigError("runner.kind kubernetes starts its pods from an Airflow task "
                              "(the KubernetesPodOperator); outside Airflow, use the local or "
                              "docker runner")
        from retrain_lib.training.runners.kubernetes import run_in_pod

        return run_in_pod(runner.kubernetes, request, launch_pod, environment=environment,
                          fresh=fresh)
    if runner.kind == "docker":
        from retrain_lib.training.runners.docker import DockerRunner

        return DockerRunner(runner.docker, environment=environment, logger=logger).run(
            request, fresh=fresh)
    from retrain_lib.training.runners.local import LocalRunner

    return LocalRunner(environment=environment, logger=logger).run(request, fresh=fresh)
