"""The one module of retrain_lib that imports Airflow: what the DAG files share.

Everything else in retrain_lib runs without a scheduler. This module adds what only makes sense
inside Airflow:

* :func:`load_dag_configs` and the parse-time knobs (:data:`ENV_CONFIGS`, ...): read while the
  DAG processor parses the DAG files, so they use the environment only (never Variables, which
  would cost a metadata-database call per parse).
* :func:`cycle_settings`: the :class:`~retrain_lib.cycle.CycleSettings` of a running task, from
  Airflow Variables first (editable in the UI) and the environment second.
* :func:`retrain_errors`: turns a :class:`~retrain_lib.errors.RetrainError` into one log line and
  the right Airflow exception: bad input or settings fail at once, storage and training hiccups
  are retried.
* :func:`champion_asset`: the Asset a retraining DAG updates when it promotes a new champion,
  and that the detect DAG listens to.
* :class:`MlflowLink` and the :func:`mlflow_task` decorator: the "MLflow" button of the train
  and register tasks (also registered by the plugin in ``plugins/``).

Only ``airflow.sdk`` and the standard provider's PythonOperator are imported at module level,
both of which a TaskFlow DAG file imports anyway, so parsing stays fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import Asset, BaseOperatorLink, get_current_context
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from retrain_lib.config import ObjectTypeConfig, load_object_type_configs
from retrain_lib.errors import RetrainError, StorageError, TrainingFailed

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

    from retrain_lib.cycle import CycleSettings

__all__ = [
    "ENV_CONFIGS",
    "ENV_DETECT_SCHEDULE",
    "ENV_MLFLOW_UI",
    "ENV_TASK_RETRIES",
    "MLFLOW_LINK_XCOM",
    "MlflowLink",
    "MlflowLinkedOperator",
    "champion_asset",
    "current_cycle_id",
    "cycle_settings",
    "detect_schedule",
    "load_dag_configs",
    "mlflow_model_page",
    "mlflow_run_page",
    "mlflow_task",
    "mlflow_ui_url",
    "publish_mlflow_link",
    "retrain_errors",
    "retry_args",
]

log = logging.getLogger(__name__)

ENV_CONFIGS = "AUTORETRAIN_CONFIGS"
"""Folder of object-type YAML files the DAG files read (default: the repo's configs)."""
ENV_TASK_RETRIES = "AUTORETRAIN_TASK_RETRIES"
"""Retries of each task that can fail transiently (default 3; the demo and tests use 0)."""
ENV_DETECT_SCHEDULE = "AUTORETRAIN_DETECT_SCHEDULE"
"""Cron expression of the detect DAGs' time schedule (default hourly)."""
ENV_MLFLOW_UI = "AUTORETRAIN_MLFLOW_UI_URL"
"""Base URL browsers reach the MLflow UI at (the tracking URI may name a container)."""

VAR_STORAGE = "autoretrain_storage"
VAR_MLFLOW_URI = "autoretrain_mlflow_tracking_uri"  # the same Variable the Docker runner reads
VAR_MLFLOW_UI = "autoretrain_mlflow_ui_url"
MLFLOW_LINK_XCOM = "autoretrain_mlflow_url"
"""XCom key under which a task stores the MLflow page its "MLflow" button opens."""

DEFAULT_RETRIES = 3
DEFAULT_DETECT_SCHEDULE = "0 * * * *"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- parse time


def default_configs_dir(dag_file: str | Path) -> Path:
    """$AUTORETRAIN_CONFIGS, else ``configs/object_types`` beside the DAG folder."""
    configured = os.environ.get(ENV_CONFIGS)
    if configured:
        return Path(configured)
    return Path(dag_file).resolve().parent.parent / "configs" / "object_types"


def load_dag_configs(dag_file: str | Path) -> dict[str, ObjectTypeConfig]:
    """Every object-type config a DAG file turns into DAGs, keyed by type.

    A broken config raises :class:`~retrain_lib.errors.ConfigError`, which Airflow shows as an
    import error of the DAG file naming the file and field: better than a silently missing DAG.
    """
    return load_object_type_configs(default_configs_dir(dag_file))


def retry_args(retries: int | None = None, *, delay_s: float = 60,
               max_delay_s: float = 1800) -> dict[str, Any]:
    """Task arguments for a step that can fail transiently: retries with exponential backoff.

    ``retries`` defaults to $AUTORETRAIN_TASK_RETRIES, else 3.
    """
    if retries is None:
        raw = os.environ.get(ENV_TASK_RETRIES, "")
        retries = int(raw) if raw.strip().isdigit() else DEFAULT_RETRIES
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


# --------------------------------------------------------------------------- run time


def _setting(variable: str, env: str) -> str | None:
    from airflow.sdk import Variable

    return Variable.get(variable, default=None) or os.environ.get(env) or None


def cycle_settings() -> CycleSettings:
    """Settings of a running task: Airflow Variables first, then the environment.

    ``autoretrain_storage`` / $AUTORETRAIN_STORAGE: storage root;
    ``autoretrain_mlflow_tracking_uri`` / $MLFLOW_TRACKING_URI: MLflow;
    $AUTORETRAIN_SCRATCH: local scratch; $AUTORETRAIN_S3_CONN_ID: Airflow 'aws' connection.
    """
    from retrain_lib.cycle import CycleSettings
    from retrain_lib.storage import ENV_S3_CONN_ID, ENV_STORAGE, default_storage_uri

    return CycleSettings(
        storage_uri=_setting(VAR_STORAGE, ENV_STORAGE) or default_storage_uri(),
        mlflow_uri=_setting(VAR_MLFLOW_URI, "MLFLOW_TRACKING_URI"),
        scratch=os.environ.get("AUTORETRAIN_SCRATCH") or None,
        aws_conn_id=os.environ.get(ENV_S3_CONN_ID) or None)


def current_cycle_id(context: Mapping[str, Any] | None = None) -> str:
    """The cycle id of the running DAG run (see :func:`retrain_lib.cycle.run_cycle_id`).

    Its logical date when it has one, else its run id: retries, cleared tasks and re-runs of
    the same logical date all find the cycle's earlier work.
    """
    from retrain_lib.cycle import run_cycle_id

    context = context if context is not None else get_current_context()
    return run_cycle_id(str(context["run_id"]), context.get("logical_date"))


_TRANSIENT = (StorageError, TrainingFailed)


@contextmanager
def retrain_errors() -> Iterator[None]:
    """Turn a RetrainError into one log line and the right Airflow exception.

    Storage and training failures may pass on a retry, so they raise AirflowException (the task
    retries with backoff). Bad input, bad settings and every other RetrainError fail the task
    at once (AirflowFailException): a retry cannot fix them. Other exceptions are bugs and keep
    their traceback.
    """
    try:
        yield
    except RetrainError as exc:
        message = str(exc)
        log.error("%s: %s", type(exc).__name__, message)
        if isinstance(exc, _TRANSIENT):
            raise AirflowException(message) from None
        raise AirflowFailException(message) from None


# --------------------------------------------------------------------------- MLflow links


def mlflow_ui_url(tracking_uri: str | None = None, *, use_variables: bool = True) -> str:
    """Base URL of the MLflow UI.

    The ``autoretrain_mlflow_ui_url`` Variable (inside tasks, when ``use_variables``) or
    $AUTORETRAIN_MLFLOW_UI_URL; else an http(s) tracking URI itself; else
    http://127.0.0.1:5000, where ``autoretrain up`` serves it.
    """
    configured = (_setting(VAR_MLFLOW_UI, ENV_MLFLOW_UI) if use_variables
                  else os.environ.get(ENV_MLFLOW_UI))
    if not configured and tracking_uri and tracking_uri.startswith(("http://", "https://")):
        configured = tracking_uri
    return (configured or DEFAULT_MLFLOW_UI).rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(base: str, model_name: str, version: str | None = None) -> str:
    """The MLflow UI page of a registered model, or of one of its versions."""
    page = f"{base}/#/models/{model_name}"
    return f"{page}/versions/{version}" if version else page


def mlflow_run_page(tracking_uri: str, run_id: str) -> str:
    """The MLflow UI page of a training run, or "" when MLflow cannot say its experiment.

    A link is a convenience: failing to make one must not fail a finished training.
    """
    from mlflow import MlflowClient

    try:
        experiment = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception as exc:  # MLflow raises several kinds for an unreachable server
        log.warning("no MLflow link for run %s: %s", run_id, exc)
        return ""
    return run_url(mlflow_ui_url(tracking_uri), experiment, run_id)


def mlflow_model_page(tracking_uri: str, model_name: str, version: str | None) -> str:
    """The MLflow UI page of a registered model version (or of the model without one)."""
    return model_version_url(mlflow_ui_url(tracking_uri), model_name, version)


def publish_mlflow_link(url: str, context: Mapping[str, Any] | None = None) -> None:
    """Store the page the running task's "MLflow" button opens (nothing for an empty URL)."""
    if not url:
        return
    context = context if context is not None else get_current_context()
    context["ti"].xcom_push(key=MLFLOW_LINK_XCOM, value=url)


class MlflowLink(BaseOperatorLink):
    """The "MLflow" button of a task: its training run, or its registered model version.

    The task stores the URL with :func:`publish_mlflow_link`; when the task finishes, the
    worker asks this link for the URL and Airflow keeps it for the UI.
    """

    name: ClassVar[str] = "MLflow"  # type: ignore[misc]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        try:
            url = XCom.get_value(ti_key=ti_key, key=MLFLOW_LINK_XCOM)
        except Exception:  # no link stored (the task failed early): no button target
            return ""
        return str(url) if url else ""


class MlflowLinkedOperator(DecoratedOperator, PythonOperator):
    """A TaskFlow ``@task`` operator with the "MLflow" extra link (see :func:`mlflow_task`)."""

    template_fields = ("templates_dict", "op_args", "op_kwargs")
    custom_operator_name = "@task"
    operator_extra_links = (MlflowLink(),)

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Any, op_kwargs: Any,
                 **kwargs: Any) -> None:
        super().__init__(kwargs_to_upstream={"python_callable": python_callable,
                                             "op_args": op_args, "op_kwargs": op_kwargs},
                         python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs,
                         **kwargs)


def mlflow_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """Like ``@task``, plus an "MLflow" button that opens the page the task published.

    Works with ``.expand()``: every mapped instance gets its own link.
    """
    kwargs.setdefault("multiple_outputs", False)  # one XCom per result, not one per key
    return task_decorator_factory(python_callable=python_callable,
                                  decorated_operator_class=MlflowLinkedOperator, **kwargs)
