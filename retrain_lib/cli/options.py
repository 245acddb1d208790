"""Options several commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DEFAULT_CONFIGS", "ConfigDirOption", "MlflowUriOption", "StorageOption"]

DEFAULT_CONFIGS = Path("configs/object_types")

ConfigDirOption = Annotated[Path, typer.Option(
    "--configs", help="Folder of object-type configs.", envvar="AUTORETRAIN_CONFIGS")]
MlflowUriOption = Annotated[str | None, typer.Option(
    "--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a local "
    "SQLite file).")]

StorageOption = Annotated[str | None, typer.Option(
    "--storage", help="Storage root (default $AUTORETRAIN_STORAGE or .autoretrain/storage).")]
