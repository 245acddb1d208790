"""The "MLflow" button of the train and register tasks, and the MLflow UI's address.

A task stores the page its button opens with :func:`publish_mlflow_link`; when the task
finishes, the worker asks :class:`MlflowLink` for the URL and Airflow keeps it for the UI.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import BaseOperatorLink, get_current_context
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from retrain_lib.airflow.hooks import setting

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

__all__ = [
    "ENV_MLFLOW_UI",
    "MLFLOW_LINK_XCOM",
    "MlflowLink",
    "MlflowLinkedOperator",
    "mlflow_model_page",
    "mlflow_run_page",
    "mlflow_task",
    "mlflow_ui_url",
    "model_version_url",
    "publish_mlflow_link",
    "run_url",
]

log = logging.getLogger(__name__)

ENV_MLFLOW_UI = "AUTORETRAIN_MLFLOW_UI_URL"
"""Base URL browsers reach the MLflow UI at (the tracking URI may name a container)."""
VAR_MLFLOW_UI = "autoretrain_mlflow_ui_url"
MLFLOW_LINK_XCOM = "autoretrain_mlflow_url"
"""XCom key under which a task stores the MLflow page its "MLflow" button opens."""
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_ui_url(tracking_uri: str | None = None, *, use_variables: bool = True) -> str:
    """Base URL of the MLflow UI.

    The ``autoretrain_mlflow_ui_url`` Variable (inside tasks, when ``use_variables``) or
    $AUTORETRAIN_MLFLOW_UI_URL; else an http(s) tracking URI itself; else
    http://127.0.0.1:5000, where ``autoretrain up`` serves it.
    """
    configured = (setting(VAR_MLFLOW_UI, ENV_MLFLOW_UI) if use_variables
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


def mlflow_run_page(run_id: str, tracking_uri: str | None = None) -> str:
    """The MLflow UI page of a training run, or "" when MLflow cannot say its experiment.

    ``tracking_uri`` defaults to the running task's. A link is a convenience: failing to make
    one must not fail a finished training.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or _task_tracking_uri()
    try:
        experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except Exception as exc:  # MLflow raises several kinds for an unreachable server
        log.warning("no MLflow link for run %s: %s", run_id, exc)
        return ""
    return run_url(mlflow_ui_url(uri), experiment, run_id)


def mlflow_model_page(model_name: str, version: str | None,
                      tracking_uri: str | None = None) -> str:
    """The MLflow UI page of a registered model version (or of the model without one)."""
    return model_version_url(mlflow_ui_url(tracking_uri or _task_tracking_uri()), model_name,
                             version)


def _task_tracking_uri() -> str:
    from retrain_lib.airflow.hooks import cycle_settings

    return cycle_settings().tracking_uri


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

    name: ClassVar[str] = "MLflow"

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
