"""Where AutoRetrain reads and writes by default: environment variables and embedded defaults.

Every setting a user can give through the environment is named here once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = [
    "DEFAULT_MLFLOW_DB",
    "DEFAULT_STORAGE",
    "ENV_S3_CONN_ID",
    "ENV_S3_ENDPOINT",
    "ENV_SCRATCH",
    "ENV_STORAGE",
    "ENV_TRACKING_URI",
    "default_storage_uri",
    "default_tracking_uri",
    "scratch_root",
]

ENV_STORAGE = "AUTORETRAIN_STORAGE"
"""Storage root: a local path or ``s3://bucket/prefix``."""
ENV_S3_ENDPOINT = "AUTORETRAIN_S3_ENDPOINT_URL"
"""S3-compatible endpoint (MinIO, moto); ``AWS_ENDPOINT_URL`` also works."""
ENV_S3_CONN_ID = "AUTORETRAIN_S3_CONN_ID"
"""Airflow ``aws`` connection whose endpoint and keys S3 storage uses (inside Airflow only)."""
ENV_SCRATCH = "AUTORETRAIN_SCRATCH"
"""Root of local working files (default: the system temp dir)."""
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
"""MLflow's own variable: the tracking server or database."""

DEFAULT_STORAGE = ".autoretrain/storage"
DEFAULT_MLFLOW_DB = ".autoretrain/mlflow.db"


def default_storage_uri() -> str:
    """The storage root from AUTORETRAIN_STORAGE, else ``.autoretrain/storage`` (embedded)."""
    return os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file under ``.autoretrain`` (embedded default)."""
    uri = os.environ.get(ENV_TRACKING_URI)
    if uri:
        return uri
    path = Path(DEFAULT_MLFLOW_DB).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def scratch_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The absolute root of local working files: ``override``, $AUTORETRAIN_SCRATCH or the
    system temp dir. Absolute, because Ultralytics resolves relative paths against its own
    folders."""
    raw = override or os.environ.get(ENV_SCRATCH) or tempfile.gettempdir()
    return Path(raw).expanduser().resolve()
