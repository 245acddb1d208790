"""Where a training runs: a local child process, or a container on a Docker host.

Every runner runs the same entrypoint (``python -m retrain_lib.training``) with the same
arguments (:meth:`~retrain_lib.training.contract.TrainRequest.to_argv`) and reads its last
output line back as a :class:`~retrain_lib.training.contract.TrainResult`. Airflow is not
needed: a runner works the same from a task, ``autoretrain cycle`` or a script.
"""

from __future__ import annotations

import logging

from retrain_lib.core.config import RunnerConfig
from retrain_lib.training.contract import TrainRequest, TrainResult
from retrain_lib.training.runners.environment import TrainingEnvironment

__all__ = ["run_training"]


def run_training(request: TrainRequest, runner: RunnerConfig | None = None, *,
                 environment: TrainingEnvironment | None = None, fresh: bool = False,
                 logger: logging.Logger | None = None) -> TrainResult:
    """Run one training with the runner the object type's config names (default: local).

    Args:
        request: What to train.
        runner: The object type's runner settings.
        environment: S3 and MLflow access for the training (default: this process's
            environment).
        fresh: Discard an interrupted attempt instead of resuming it.
        logger: Where the training's output lines go (default: the runner's logger).
    """
    runner = runner or RunnerConfig()
    if runner.kind == "docker":
        from retrain_lib.training.runners.docker import DockerRunner

        return DockerRunner(runner.docker, environment=environment, logger=logger).run(
            request, fresh=fresh)
    from retrain_lib.training.runners.local import LocalRunner

    return LocalRunner(environment=environment, logger=logger).run(request, fresh=fresh)
