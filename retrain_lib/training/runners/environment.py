"""What a training process needs to reach S3 and MLflow, and how runners report failures."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from retrain_lib.core.errors import TrainingFailed
from retrain_lib.core.settings import ENV_S3_CONN_ID
from retrain_lib.core.storage import S3Settings
from retrain_lib.training.contract import TrainRequest

__all__ = ["LOG_TAIL_LINES", "TrainingEnvironment", "failure", "stream_lines"]

LOG_TAIL_LINES = 400


@dataclass(frozen=True)
class TrainingEnvironment:
    """Environment variables of a training process: ``public`` ones (endpoints, region) and
    ``private`` ones (keys, passwords) that are never logged.

    Build it with :meth:`build` from resolved settings (inside Airflow: from its connections)
    or take this process's own with :meth:`from_process`.
    """

    public: Mapping[str, str] = field(default_factory=dict)
    private: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, *, s3: S3Settings | None = None, mlflow_uri: str | None = None,
              mlflow_username: str | None = None, mlflow_password: str | None = None
              ) -> TrainingEnvironment:
        """The variables that give a child the same S3 and MLflow access as given here."""
        public, private = (s3 or S3Settings.from_env()).environment()
        for name, value in (("MLFLOW_TRACKING_URI", mlflow_uri),  # may embed credentials
                            ("MLFLOW_TRACKING_USERNAME", mlflow_username),
                            ("MLFLOW_TRACKING_PASSWORD", mlflow_password)):
            if value:
                private[name] = value
        return cls(public, private)

    @classmethod
    def from_process(cls) -> TrainingEnvironment:
        """This process's S3 and MLflow variables."""
        return cls.build(mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                         mlflow_username=os.environ.get("MLFLOW_TRACKING_USERNAME"),
                         mlflow_password=os.environ.get("MLFLOW_TRACKING_PASSWORD"))

    def request_for_child(self, request: TrainRequest) -> TrainRequest:
        """``request`` as the child gets it: when this environment gives the tracking URI
        (which may embed credentials), it stays out of the command line and its logs."""
        if "MLFLOW_TRACKING_URI" in self.private:
            return request.model_copy(update={"mlflow_uri": None})
        return request

    def apply_to(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with these variables set. The Airflow connection id is dropped: the child
        gets the resolved settings, and it runs outside Airflow."""
        env = {k: v for k, v in base.items() if k != ENV_S3_CONN_ID}
        return {**env, **self.public, **self.private, "PYTHONUNBUFFERED": "1"}


def stream_lines(chunks: Iterable[bytes | str]) -> Iterator[str]:
    """Split a stream of output chunks into text lines (progress bars redraw with '\\r')."""
    pending = ""
    for chunk in chunks:
        text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else str(chunk)
        pending += text.replace("\r", "\n")
        *lines, pending = pending.split("\n")
        for line in lines:
            if line.rstrip():
                yield line.rstrip()
    if pending.rstrip():
        yield pending.rstrip()


def _error_line(lines: Sequence[str]) -> str:
    """The entrypoint's one-line error message, if it printed one."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return ""


def failure(what: str, code: int, lines: Sequence[str]) -> TrainingFailed:
    """The error of a training that exited with ``code``: its own message and the log tail."""
    reason = _error_line(lines)
    kind = " (bad input or settings)" if code == 2 else ""
    message = f"{what} exited with code {code}{kind}"
    return TrainingFailed(f"{message}: {reason}" if reason else message, logs="\n".join(lines))
