"""AutoRetrain's Airflow plugin: MLflow links in the Airflow UI.

* The **MLflow** button (an operator extra link) of the ``train`` tasks opens the task's MLflow
  training run, and that of ``register_and_promote`` the registered model version it promoted
  (or the current champion). In Airflow 3 the button comes with the operator: the link class
  and the operator that carries it live in :mod:`retrain_lib.airflow.links`; the worker asks
  the link for the URL when the task ends and stores it, and the API server shows what was
  stored (the serialized DAG names the link and its storage key). The link is listed here so
  that ``airflow plugins`` and the plugins API show it; it is deliberately bound to no operator,
  since a plugin-bound link replaces the stored one and the API server would have to compute
  the URL itself, which only a worker can.
* An **MLflow** entry in the UI's navigation opens the MLflow UI.

The MLflow UI's address is $AUTORETRAIN_MLFLOW_UI_URL, else $MLFLOW_TRACKING_URI when that is an
http(s) server, else http://127.0.0.1:5000 (what ``autoretrain up`` starts).
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

from retrain_lib.airflow.links import MlflowLink, mlflow_ui_url


class AutoRetrainPlugin(AirflowPlugin):
    """Registers the MLflow extra link and an MLflow navigation entry."""

    name = "autoretrain"
    operator_extra_links = [MlflowLink()]  # noqa: RUF012  (plugin attributes are lists)
    external_views = [  # noqa: RUF012
        {"name": "MLflow", "href": mlflow_ui_url(os.environ.get("MLFLOW_TRACKING_URI"),
                                                 use_variables=False),
         "destination": "nav", "category": "browse"},
    ]
