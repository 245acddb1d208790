"""What the DAG files read while the DAG processor parses them: cheap, environment only.

Never Variables here: each would cost a metadata-database call per parse. Only
``airflow.sdk`` is imported, which a TaskFlow DAG file imports anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset

from retrain_lib.core.config import ConfigFolder, read_object_type_configs
from retrain_lib.core.errors import ConfigError

__all__ = [
    "ENV_CONFIGS",
    "ENV_DETECT_SCHEDULE",
    "ENV_TASK_RETRIES",
    "ENV_TASK_RETRY_DELAY",
    "broken_configs_dag",
    "champion_asset",
    "default_configs_dir",
    "detect_schedule",
    "load_dag_configs",
    "retry_args",
]

ENV_CONFIGS = "AUTORETRAIN_CONFIGS"
"""Folder of object-type YAML files the DAG files read (default: the repo's configs)."""
ENV_TASK_RETRIES = "AUTORETRAIN_TASK_RETRIES"
"""Retries of each task that can fail transiently (default 3; the demo and tests use 0)."""
ENV_TASK_RETRY_DELAY = "AUTORETRAIN_TASK_RETRY_DELAY_S"
"""Seconds before every task's first retry (default: 60, and 300 for ``train``)."""
ENV_DETECT_SCHEDULE = "AUTORETRAIN_DETECT_SCHEDULE"
"""Cron expression of the detect DAGs' time schedule (default hourly)."""

DEFAULT_RETRIES = 3
DEFAULT_DETECT_SCHEDULE = "0 * * * *"


def default_configs_dir(dag_file: str | Path) -> Path:
    """$AUTORETRAIN_CONFIGS, else ``configs/object_types`` beside the DAG folder."""
    configured = os.environ.get(ENV_CONFIGS)
    if configured:
        return Path(configured)
    return Path(dag_file).resolve().parent.parent / "configs" / "object_types"


def load_dag_configs(dag_file: str | Path) -> ConfigFolder:
    """The object-type configs a DAG file turns into DAGs: the valid ones keyed by type, and
    one message per broken file (see :func:`broken_configs_dag`).

    Raises:
        ConfigError: the config folder is missing (an import error of the DAG file).
    """
    return read_object_type_configs(default_configs_dir(dag_file))


def broken_configs_dag(problems: Sequence[str], dag_id: str) -> DAG:
    """A DAG that Airflow refuses when it bags it, with the broken configs as the reason.

    Airflow keeps the other DAGs of a file when one of them fails its validation, and shows
    that failure as an import error of the file: so one broken YAML names its file and field
    in the UI (and ``airflow dags list-import-errors``), while every valid object type keeps
    its DAGs, runs in flight included. A module-level exception would drop them all.
    """
    message = (f"{len(problems)} object-type config(s) in {ENV_CONFIGS} are broken; their "
               "DAGs are missing until fixed:\n" + "\n".join(problems))

    class BrokenConfigs(DAG):
        def validate(self) -> None:
            raise ConfigError(message)

    return BrokenConfigs(dag_id=dag_id, schedule=None, doc_md=message, tags=["autoretrain"])


def retry_args(retries: int | None = None, *, delay_s: float = 60,
               max_delay_s: float = 1800) -> dict[str, Any]:
    """Task arguments for a step that can fail transiently: retries with exponential backoff.

    ``retries`` defaults to $AUTORETRAIN_TASK_RETRIES, else 3; $AUTORETRAIN_TASK_RETRY_DELAY_S,
    when set, replaces ``delay_s``.
    """
    if retries is None:
        raw = os.environ.get(ENV_TASK_RETRIES, "")
        retries = int(raw) if raw.strip().isdigit() else DEFAULT_RETRIES
    raw_delay = os.environ.get(ENV_TASK_RETRY_DELAY, "").strip()
    if raw_delay:
        try:
            delay_s = float(raw_delay)
        except ValueError:
            raise ConfigError(f"${ENV_TASK_RETRY_DELAY}={raw_delay!r}: expected a number of "
                              "seconds") from None
    return {"retries": retries, "retry_delay": timedelta(seconds=delay_s),
            "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(seconds=max_delay_s)}


def detect_schedule() -> str:
    """Cron expression of the detect DAGs' time schedule."""
    return os.environ.get(ENV_DETECT_SCHEDULE) or DEFAULT_DETECT_SCHEDULE


def champion_asset(object_type: str) -> Asset:
    """The Asset updated when ``object_type`` gets a new champion.

    Its URI is ``x-autoretrain://<type>/champion``: Airflow leaves ``x-`` schemes alone, while
    any other scheme makes it load every provider's URI handlers (boto3 among them), which
    would add about half a second to each DAG file's parse.
    """
    return Asset(name=f"{object_type}_champion", uri=f"x-autoretrain://{object_type}/champion",
                 group="model")
