"""The one weights resolver: files, storage URIs (S3 over HTTP, file://) and their errors.

``models:/`` URIs are resolved against a real MLflow registry in tests/stages/test_registry.py
and tests/stages/test_inference.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest

from retrain_lib.core.errors import ConfigError, InputError
from retrain_lib.stages.weights import parse_models_uri, resolve_model

WEIGHTS = b"not really a checkpoint, but bytes to fetch"


def test_a_local_file_is_named_by_its_run_folder(tmp_path: Path) -> None:
    path = tmp_path / "models" / "vehicle" / "c1-base" / "weights" / "best.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(WEIGHTS)
    ref = resolve_model(path)
    assert ref.weights == path and ref.name == "c1-base" and not ref.registered
    assert ref.version == f"sha256:{hashlib.sha256(WEIGHTS).hexdigest()[:12]}"
    assert resolve_model(path.as_uri(), cache_dir=tmp_path / "cache").name == "c1-base"


def test_weights_on_s3_are_downloaded_once(s3_bucket: str, s3_env: str, tmp_path: Path) -> None:
    # What a cycle on S3 storage hands to evaluate: the weights' storage URI.
    key = "data/models/vehicle/c1-base/weights/best.pt"
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.put_object(Bucket=s3_bucket, Key=key, Body=WEIGHTS)
    uri = f"s3://{s3_bucket}/{key}"
    ref = resolve_model(uri, cache_dir=tmp_path / "cache")
    assert ref.weights.read_bytes() == WEIGHTS and ref.weights.is_relative_to(tmp_path / "cache")
    assert ref.name == "c1-base" and ref.source == uri
    s3.delete_object(Bucket=s3_bucket, Key=key)
    assert resolve_model(uri, cache_dir=tmp_path / "cache").weights == ref.weights  # cached


def test_missing_or_foreign_weights_are_clear_errors(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/models/x/weights/best.pt: model "
                                         "weights file not found"):
        resolve_model(f"s3://{s3_bucket}/models/x/weights/best.pt", cache_dir=tmp_path)
    with pytest.raises(InputError, match=r"missing\.pt: model weights file not found"):
        resolve_model(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"notes\.txt: expected YOLO weights \(\.pt"):
        resolve_model(tmp_path / "notes.txt")


@pytest.mark.parametrize(("uri", "parsed"), [
    ("models:/autoretrain-vehicle@champion", ("autoretrain-vehicle", "champion", None)),
    ("models:/autoretrain-vehicle/7", ("autoretrain-vehicle", None, "7")),
])
def test_model_uris(uri: str, parsed: tuple[str, str | None, str | None]) -> None:
    assert parse_models_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["models:/", "models:/name", "models:/name/latest",
                                 "models:/name@"])
def test_malformed_model_uris_say_what_is_expected(uri: str) -> None:
    with pytest.raises(ConfigError, match="expected models:/<name>@<alias>"):
        parse_models_uri(uri)
