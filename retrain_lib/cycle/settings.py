"""Where a cycle reads and writes, and how a cycle is named."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from retrain_lib.core.io import safe_id
from retrain_lib.core.settings import default_storage_uri, default_tracking_uri, scratch_root
from retrain_lib.core.storage import S3Settings, Storage, open_storage
from retrain_lib.training.runners.environment import TrainingEnvironment

__all__ = ["CycleSettings", "run_cycle_id", "safe_cycle_id"]


@dataclass(frozen=True)
class CycleSettings:
    """Where a cycle reads and writes. Defaults are the embedded ones.

    Attributes:
        storage_uri: The storage root (a path or ``s3://bucket/prefix``).
        mlflow_uri: MLflow tracking URI; None: $MLFLOW_TRACKING_URI or the embedded SQLite.
        scratch: Root of local working files; None: $AUTORETRAIN_SCRATCH or the temp dir.
        s3: S3 endpoint and keys; None: the environment and boto3's chain. Inside Airflow
            they come from the connection named by $AUTORETRAIN_S3_CONN_ID.
        mlflow_username: MLflow server user (inside Airflow: from its connection).
        mlflow_password: MLflow server password.
    """

    storage_uri: str = field(default_factory=default_storage_uri)
    mlflow_uri: str | None = None
    scratch: str | None = None
    s3: S3Settings | None = None
    mlflow_username: str | None = None
    mlflow_password: str | None = field(default=None, repr=False)

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI the cycle uses."""
        return self.mlflow_uri or default_tracking_uri()

    def storage(self) -> Storage:
        """The storage root."""
        return open_storage(self.storage_uri, s3=self.s3)

    def scratch_dir(self, name: str) -> Path:
        """A local working folder of this cycle's, created on first use."""
        path = scratch_root(self.scratch) / "autoretrain" / safe_id(name, replacement="_")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def training_environment(self) -> TrainingEnvironment:
        """S3 and MLflow access for a training process or container."""
        return TrainingEnvironment.build(s3=self.s3, mlflow_uri=self.tracking_uri,
                                         mlflow_username=self.mlflow_username,
                                         mlflow_password=self.mlflow_password)


def safe_cycle_id(raw: str) -> str:
    """A storage- and MLflow-safe cycle id from e.g. an Airflow run id."""
    return safe_id(raw, replacement="_", max_length=100, fallback="cycle")


def run_cycle_id(run_id: str, logical_date: datetime | None = None) -> str:
    """The cycle id of an Airflow DAG run.

    A run with a logical date is keyed by it, so every run of the same logical date (a re-run,
    which Airflow 3 gives a new run id, a cleared task, a retry) is the same cycle and finds
    its earlier work. A run without one (a manual trigger) is keyed by its run id.
    """
    if logical_date is None:
        return safe_cycle_id(run_id)
    when = logical_date.astimezone(UTC)
    fraction = f".{when.microsecond:06d}" if when.microsecond else ""
    return safe_cycle_id(when.strftime("%Y-%m-%dT%H-%M-%S") + fraction + "Z")
