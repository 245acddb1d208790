"""The Airflow adapter: error mapping, settings, retries, the Asset and the MLflow link."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from retrain_lib.airflow.dag_config import champion_asset, default_configs_dir, retry_args
from retrain_lib.airflow.hooks import cycle_settings
from retrain_lib.airflow.links import (
    MlflowLink,
    MlflowLinkedOperator,
    mlflow_ui_url,
    model_version_url,
    run_url,
)
from retrain_lib.airflow.tasks import retrain_errors
from retrain_lib.core.errors import (
    ConfigError,
    InputError,
    RetrainError,
    StorageError,
    TrainingFailed,
)
from retrain_lib.core.storage import S3Storage


@pytest.mark.parametrize("error", [ConfigError("bad field"), InputError("bad drop"),
                                   RetrainError("champion changed")])
def test_errors_a_retry_cannot_fix_fail_the_task_at_once(error: RetrainError,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    with pytest.raises(AirflowFailException) as raised, retrain_errors():
        raise error
    assert str(raised.value) == str(error)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert f"{type(error).__name__}: {error}" in caplog.text


@pytest.mark.parametrize("error", [StorageError("S3 unreachable"),
                                   TrainingFailed("container exited with code 137")])
def test_transient_errors_are_retried(error: RetrainError) -> None:
    with pytest.raises(AirflowException) as raised, retrain_errors():
        raise error
    assert not isinstance(raised.value, AirflowFailException)
    assert str(error) in str(raised.value)


def test_bugs_keep_their_traceback() -> None:
    with pytest.raises(KeyError), retrain_errors():
        raise KeyError("a bug")


def test_retries_back_off_exponentially(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTORETRAIN_TASK_RETRIES", raising=False)
    args = retry_args(delay_s=30)
    assert args == {"retries": 3, "retry_delay": timedelta(seconds=30),
                    "retry_exponential_backoff": 2.0,
                    "max_retry_delay": timedelta(minutes=30)}
    monkeypatch.setenv("AUTORETRAIN_TASK_RETRIES", "0")
    assert retry_args()["retries"] == 0
    assert retry_args(5)["retries"] == 5


def test_settings_come_from_variables_then_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORETRAIN_STORAGE", "/data/env-storage")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-mlflow:5000")
    settings = cycle_settings()
    assert settings.storage_uri == "/data/env-storage"
    assert settings.mlflow_uri == "http://env-mlflow:5000"
    # An Airflow Variable (here from its environment form) wins: ops change it in the UI.
    monkeypatch.setenv("AIRFLOW_VAR_AUTORETRAIN_STORAGE", "s3://bucket/prod")
    monkeypatch.setenv("AIRFLOW_VAR_AUTORETRAIN_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = cycle_settings()
    assert settings.storage_uri == "s3://bucket/prod"
    assert settings.mlflow_uri == "http://mlflow:5000"


def test_configs_folder_defaults_to_the_repo(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: object) -> None:
    monkeypatch.delenv("AUTORETRAIN_CONFIGS", raising=False)
    from tests.conftest import REPO_ROOT

    assert default_configs_dir(REPO_ROOT / "dags" / "retrain.py") == (
        REPO_ROOT / "configs" / "object_types")
    monkeypatch.setenv("AUTORETRAIN_CONFIGS", "/etc/autoretrain/types")
    assert str(default_configs_dir(REPO_ROOT / "dags" / "retrain.py")) == (
        "/etc/autoretrain/types")


def test_champion_asset_is_one_per_type() -> None:
    asset = champion_asset("vehicle")
    assert asset.uri == "x-autoretrain://vehicle/champion" and asset.name == "vehicle_champion"
    assert champion_asset("aircraft") != asset


def test_mlflow_ui_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTORETRAIN_MLFLOW_UI_URL", raising=False)
    assert mlflow_ui_url("sqlite:///x.db", use_variables=False) == "http://127.0.0.1:5000"
    assert mlflow_ui_url("http://mlflow:5000/", use_variables=False) == "http://mlflow:5000"
    # In compose the tracking URI names a container; browsers need the published address.
    monkeypatch.setenv("AUTORETRAIN_MLFLOW_UI_URL", "http://localhost:5000")
    assert mlflow_ui_url("http://mlflow:5000", use_variables=False) == "http://localhost:5000"
    assert mlflow_ui_url("http://mlflow:5000") == "http://localhost:5000"


def test_mlflow_pages() -> None:
    assert run_url("http://m", "3", "abc") == "http://m/#/experiments/3/runs/abc"
    assert model_version_url("http://m", "autoretrain-vehicle", "7") == (
        "http://m/#/models/autoretrain-vehicle/versions/7")
    assert model_version_url("http://m", "autoretrain-vehicle", None) == (
        "http://m/#/models/autoretrain-vehicle")


def test_mlflow_link_belongs_to_the_linked_operator() -> None:
    link = MlflowLink()
    assert link.name == "MLflow" and link.xcom_key == "_link_MlflowLink"
    assert MlflowLink.operators == []  # bound to operators by the class attribute below
    assert list(MlflowLinkedOperator.operator_extra_links) == [link]


def test_a_link_that_cannot_be_made_is_empty_not_an_error(tmp_path: object) -> None:
    from retrain_lib.airflow.links import mlflow_run_page

    assert mlflow_run_page("no-such-run", f"sqlite:///{tmp_path}/mlflow.db") == ""


def test_s3_storage_comes_from_the_aws_connection(s3_bucket: str, s3_endpoint: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The endpoint is known only to the connection, so reaching the bucket proves it was used.
    monkeypatch.delenv("AUTORETRAIN_S3_ENDPOINT_URL")
    monkeypatch.setenv("AIRFLOW_CONN_TEST_S3", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
    monkeypatch.setenv("AUTORETRAIN_S3_CONN_ID", "test_s3")
    monkeypatch.setenv("AUTORETRAIN_STORAGE", f"s3://{s3_bucket}/viaconn")
    settings = cycle_settings()
    assert settings.s3 is not None and settings.s3.endpoint_url == s3_endpoint
    assert settings.s3.aws_access_key_id == "testing"
    assert settings.s3.region_name == "us-east-1"
    storage = settings.storage()
    assert isinstance(storage, S3Storage)
    storage.put_json("x.json", {"ok": True})
    assert storage.get_json("x.json") == {"ok": True}
    # A training process gets the resolved keys, never the connection id it cannot read.
    env = settings.training_environment().apply_to({"AUTORETRAIN_S3_CONN_ID": "test_s3"})
    assert env["AUTORETRAIN_S3_ENDPOINT_URL"] == s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and "AUTORETRAIN_S3_CONN_ID" not in env
    monkeypatch.setenv("AUTORETRAIN_S3_CONN_ID", "missing_conn")
    with pytest.raises(StorageError, match="not defined"):
        cycle_settings()
