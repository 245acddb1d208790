"""The local runner: the training entrypoint as a child process of this one (the default).

Its output is streamed line by line into a logger (the task log when it runs in an Airflow
task); a non-zero exit raises :class:`~retrain_lib.core.errors.TrainingFailed` carrying the
last lines. When this process is stopped (Ctrl-C, SIGTERM, a killed task), the child's whole
process group is stopped too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from retrain_lib.core.processes import start_process, stop_process_group
from retrain_lib.training.contract import TrainRequest, TrainResult, parse_result_line
from retrain_lib.training.runners.environment import (
    LOG_TAIL_LINES,
    TrainingEnvironment,
    failure,
    stream_lines,
)

__all__ = ["LocalRunner"]

log = logging.getLogger(__name__)


class LocalRunner:
    """Runs the entrypoint as a child process of this one."""

    def __init__(self, *, python: str | None = None, env: Mapping[str, str] | None = None,
                 environment: TrainingEnvironment | None = None, cwd: str | Path | None = None,
                 logger: logging.Logger | None = None) -> None:
        """Args:
        python: Interpreter with retrain_lib installed (default: this one).
        env: Base environment of the child (default: this process's).
        environment: S3 and MLflow access set on top of ``env``.
        cwd: Working directory of the child (it writes nothing there).
        logger: Where each output line goes (default: this module's logger).
        """
        self.python = python or sys.executable
        self.environment = environment or TrainingEnvironment()
        self.env = self.environment.apply_to(dict(os.environ if env is None else env))
        self.cwd = cwd
        self.logger = logger or log

    def command(self, request: TrainRequest, *, fresh: bool = False) -> list[str]:
        """The command line this runner executes."""
        child = self.environment.request_for_child(request)
        return [self.python, "-m", "retrain_lib.training", *child.to_argv(),
                *(["--fresh"] if fresh else [])]

    def run(self, request: TrainRequest, *, fresh: bool = False) -> TrainResult:
        """Train; stream the output; return the parsed result.

        Raises:
            TrainingFailed: the process exited non-zero or printed no result.
        """
        command = self.command(request, fresh=fresh)
        self.logger.info("starting training: %s", " ".join(command))
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        # Own group: on cancel the whole group (dataloader workers too) gets the signal; and
        # it dies with this process, even when this one is killed outright.
        proc = start_process(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=self.env, cwd=self.cwd)
        try:
            assert proc.stdout is not None
            for line in stream_lines(proc.stdout):
                self.logger.info("%s", line)
                tail.append(line)
            code = proc.wait()
        except BaseException:
            stop_process_group(proc)
            raise
        if code != 0:
            raise failure("training process", code, list(tail))
        return parse_result_line(list(tail))
