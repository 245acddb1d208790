"""Airflow's connections and Variables, turned into the settings a cycle runs with.

- S3 endpoint and keys come from the ``aws`` connection named by $AUTORETRAIN_S3_CONN_ID,
  read through the amazon provider's :class:`AwsBaseHook` (login/password as keys,
  ``endpoint_url`` and ``region_name`` in the extra, or any other way the provider supports).
- MLflow: the ``autoretrain_mlflow_tracking_uri`` Variable, else $MLFLOW_TRACKING_URI; a
  connection named by $AUTORETRAIN_MLFLOW_CONN_ID adds the server's user and password (and
  its address when no URI is set).
- Storage: the ``autoretrain_storage`` Variable, else $AUTORETRAIN_STORAGE.

Variables are read at run time only (inside tasks), never while a DAG file is parsed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from retrain_lib.core.errors import ConfigError, StorageError
from retrain_lib.core.settings import (
    ENV_S3_CONN_ID,
    ENV_SCRATCH,
    ENV_STORAGE,
    ENV_TRACKING_URI,
    default_storage_uri,
)
from retrain_lib.core.storage import S3Settings

if TYPE_CHECKING:  # imported at run time only: DAG files import this module while parsed
    from retrain_lib.cycle.settings import CycleSettings

__all__ = [
    "ENV_MLFLOW_CONN_ID",
    "VAR_MLFLOW_URI",
    "VAR_STORAGE",
    "cycle_settings",
    "mlflow_connection",
    "s3_settings",
    "setting",
]

ENV_MLFLOW_CONN_ID = "AUTORETRAIN_MLFLOW_CONN_ID"
"""Names an Airflow connection (host, port, schema, login, password) of the MLflow server."""
VAR_STORAGE = "autoretrain_storage"
VAR_MLFLOW_URI = "autoretrain_mlflow_tracking_uri"


def setting(variable: str, env: str) -> str | None:
    """An Airflow Variable, else the environment variable ``env``, else None."""
    from airflow.sdk import Variable

    return Variable.get(variable, default=None) or os.environ.get(env) or None


def s3_settings(conn_id: str) -> S3Settings:
    """S3 endpoint, region and keys of an Airflow ``aws`` connection.

    Raises:
        StorageError: the connection is not defined or unreadable.
    """
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    try:
        hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
        hook.get_connection(conn_id)  # the hook falls back to boto3's chain silently
        config = hook.conn_config
    except Exception as exc:  # the provider raises several kinds for a missing connection
        raise StorageError(f"Airflow connection {conn_id!r} is not defined or unreadable "
                           f"({exc}); define it (e.g. AIRFLOW_CONN_{conn_id.upper()}) or "
                           f"unset {ENV_S3_CONN_ID}") from None
    return S3Settings(endpoint_url=config.get_service_endpoint_url("s3"),
                      region_name=config.region_name,
                      aws_access_key_id=config.aws_access_key_id,
                      aws_secret_access_key=config.aws_secret_access_key,
                      aws_session_token=config.aws_session_token)


def mlflow_connection(conn_id: str) -> tuple[str | None, str | None, str | None]:
    """``(address, user, password)`` of an Airflow connection describing the MLflow server.

    Raises:
        ConfigError: the connection is not defined or unreadable.
    """
    from airflow.sdk import Connection

    try:
        conn = Connection.get(conn_id)
    except Exception as exc:  # missing or unreadable connection
        raise ConfigError(f"Airflow connection {conn_id!r} (MLflow) is not defined or "
                          f"unreadable ({exc})") from None
    address = None
    if conn.host:
        scheme = conn.schema or conn.conn_type or "http"
        scheme = scheme if scheme in ("http", "https") else "http"
        host = conn.host if "://" in conn.host else f"{scheme}://{conn.host}"
        address = f"{host}:{conn.port}" if conn.port else host
    return address, conn.login or None, conn.password or None


def cycle_settings() -> CycleSettings:
    """The settings of a running task: Airflow Variables and connections first, then the
    environment (see the module docstring)."""
    from retrain_lib.cycle.settings import CycleSettings

    mlflow_uri = setting(VAR_MLFLOW_URI, ENV_TRACKING_URI)
    user = password = None
    mlflow_conn = os.environ.get(ENV_MLFLOW_CONN_ID)
    if mlflow_conn:
        address, user, password = mlflow_connection(mlflow_conn)
        mlflow_uri = mlflow_uri or address
    s3_conn = os.environ.get(ENV_S3_CONN_ID)
    return CycleSettings(
        storage_uri=setting(VAR_STORAGE, ENV_STORAGE) or default_storage_uri(),
        mlflow_uri=mlflow_uri, scratch=os.environ.get(ENV_SCRATCH) or None,
        s3=s3_settings(s3_conn) if s3_conn else None,
        mlflow_username=user, mlflow_password=password)
