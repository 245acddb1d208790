"""AutoRetrain's Airflow plugin: MLflow links in the Airflow UI.

* The **MLflow** button (an operator extra link) of the ``train`` tasks opens the task's MLflow
  training run, and that of ``register_and_promote`` the registered model version it promoted
  (or the current champion). The link class and the operator that carries it live in
  :mod:`retrain_lib.airflow_adapter`, so workers (which do not load plugins) record the URL;
  registering them here tells the API server which operator they belong to.
* An **MLflow** entry in the UI's navigation opens the MLflow UI.

The MLflow UI's address is $AUTORETRAIN_MLFLOW_UI_URL, else $MLFLOW_TRACKING_URI when that is an
http(s) server, else http://127.0.0.1:5000 (what ``autoretrain up`` starts).
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

from retrain_lib.airflow_adapter import MlflowLink, mlflow_ui_url


class AutoRetrainPlugin(AirflowPlugin):
    """Registers the MLflow extra link and an MLflow navigation entry."""

    name = "autoretrain"
    operator_extra_links = [MlflowLink()]  # noqa: RUF012  (plugin attributes are lists)
    external_views = [  # noqa: RUF012
        {"name": "MLflow", "href": mlflow_ui_url(os.environ.get("MLFLOW_TRACKING_URI"),
                                                 use_variables=False),
         "destination": "nav", "category": "browse"},
    ]
