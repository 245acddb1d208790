"""Model weights by reference: the one resolver of weights files and MLflow model URIs.

A source is one of

- a local weights file (``.pt``, ``.onnx``, ``.engine``, ``.torchscript``);
- a storage URI of one (``s3://bucket/models/vehicle/<run>/weights/best.pt``, ``file://...``),
  downloaded once into the cache;
- a registered model version, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``,
  resolved with the MLflow client; its source is its training run's artifact root, and the
  weights are its ``weights/best.pt`` (the registry's convention), fetched with MLflow's own
  ``download_artifacts`` once into the cache.

Inference, evaluation, mining and the training entrypoint (initial weights) all resolve models
here, so every one of them accepts every kind of source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from retrain_lib.core.errors import ConfigError, InputError, StorageError
from retrain_lib.core.io import atomic_path, file_sha256, safe_id
from retrain_lib.core.settings import scratch_root
from retrain_lib.stages.mlflow_server import mlflow_client, mlflow_errors

__all__ = [
    "WEIGHTS_IN_RUN",
    "WEIGHTS_SHA256_TAG",
    "WEIGHTS_SUFFIXES",
    "ModelRef",
    "parse_models_uri",
    "resolve_model",
]

WEIGHTS_IN_RUN = "weights/best.pt"
"""Path of the best weights under a training's output folder and among its MLflow artifacts."""
WEIGHTS_SHA256_TAG = "weights_sha256"
"""Run and model-version tag holding the SHA-256 of the weights file the training logged."""
WEIGHTS_SUFFIXES = (".pt", ".onnx", ".engine", ".torchscript")


@dataclass(frozen=True)
class ModelRef:
    """A model's weights on local disk and the identity written into every detection.

    Attributes:
        weights: Local weights file.
        name: Registered model name; for a file, its run folder (``<run>/weights/best.pt``)
            or its stem.
        version: Registered version, or ``sha256:<12 hex>`` of the weights file.
        source: What the caller gave (path or URI).
        registered: Whether ``version`` is a registered model version.
    """

    weights: Path
    name: str
    version: str
    source: str
    registered: bool = False


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, alias, version).

    Raises:
        ConfigError: the URI has neither form.
    """
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"model URI {uri!r}: expected models:/<name>@<alias> (e.g. "
                      "models:/autoretrain-vehicle@champion) or models:/<name>/<version>")


def resolve_model(source: str | os.PathLike[str], *, tracking_uri: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> ModelRef:
    """Find a model's weights on local disk (see the module docstring for the sources).

    Downloads go to ``cache_dir`` (default ``<scratch>/autoretrain-models``) and appear there
    complete or not at all.

    Raises:
        ConfigError: a malformed URI, or a file that is not a weights file.
        InputError: the file, object, model, alias or version does not exist, or the version
            has no ``weights/best.pt``.
        RegistryUnavailable: MLflow does not answer.
        StorageError: the storage holding the weights cannot be read.
    """
    text = os.fspath(source)
    cache = Path(cache_dir) if cache_dir is not None else (
        scratch_root() / "autoretrain-models")
    if text.startswith("models:/"):
        return _registered(text, tracking_uri, cache)
    if text.startswith(("s3://", "file://")):
        return _local_file(_download(text, cache), text)
    return _local_file(Path(text), text)


def _check_suffix(name: str, where: str) -> None:
    if PurePosixPath(name).suffix not in WEIGHTS_SUFFIXES:
        raise ConfigError(f"{where}: expected YOLO weights ({', '.join(WEIGHTS_SUFFIXES)}) or "
                          "an MLflow URI models:/<name>@<alias>")


def _local_file(path: Path, source: str) -> ModelRef:
    if not path.is_file():
        hint = ("; weights are never downloaded from the internet: give a path, a storage URI "
                "or models:/<name>@<alias>" if "/" not in source else "")
        raise InputError(f"{source}: model weights file not found{hint}")
    _check_suffix(path.name, source)
    # Ultralytics writes <run>/weights/best.pt: the run's folder names the model better.
    parts = PurePosixPath(source).parts if "://" in source else path.parts
    name = parts[-3] if len(parts) >= 3 and parts[-2] == "weights" else path.stem
    return ModelRef(weights=path, name=name, version=f"sha256:{file_sha256(path)[:12]}",
                    source=source)


def _download(uri: str, cache: Path) -> Path:
    from retrain_lib.core.storage import open_storage

    base, _, name = uri.rpartition("/")
    _check_suffix(name, uri)
    target = cache / "by-uri" / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if not target.is_file():
        try:
            open_storage(base).get_file(name, target)
        except StorageError as exc:
            if "no such object" in str(exc):
                raise InputError(f"{uri}: model weights file not found") from None
            raise
    return target


def _registered(uri: str, tracking_uri: str | None, cache: Path) -> ModelRef:
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    client, tracking = mlflow_client(tracking_uri)
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    try:
        with mlflow_errors(f"resolving {uri}", tracking):
            mv = (client.get_model_version_by_alias(name, alias) if alias is not None
                  else client.get_model_version(name, str(version)))
    except MlflowException as exc:  # only "not found" gets here
        raise InputError(f"{uri}: registered model {name!r} has no {what} in {tracking} "
                         f"({getattr(exc, 'message', exc)})") from None
    # Version numbers restart in every tracking server (each test, each demo): key the cache
    # by the version's source too, or another server's v1 would be served as this one's.
    source_tag = hashlib.sha256(str(mv.source).encode()).hexdigest()[:12]
    weights = (cache / safe_id(name, replacement="_") / f"{mv.version}-{source_tag}"
               / WEIGHTS_IN_RUN)
    if not weights.is_file():
        import mlflow.artifacts

        artifact_uri = f"{str(mv.source).rstrip('/')}/{WEIGHTS_IN_RUN}"
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            fetched = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=tracking)
            with atomic_path(weights) as tmp:
                os.replace(fetched, tmp)
        except (MlflowException, OSError) as exc:
            raise InputError(f"{uri}: version {mv.version} has no {WEIGHTS_IN_RUN} under "
                             f"{mv.source} ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ModelRef(weights=weights, name=name, version=str(mv.version), source=uri,
                    registered=True)
