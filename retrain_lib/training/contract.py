"""The training contract: what a training is asked to do, and what it hands back.

Every runner (a local process, a Docker container, a Kubernetes pod) runs the same entrypoint
with the same request (:meth:`TrainRequest.to_argv`) and reads its last output line back as a
:class:`TrainResult` (:func:`parse_result_line`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrain_lib.core.config import TrainArguments, format_validation_error
from retrain_lib.core.device import DeviceName
from retrain_lib.core.errors import ConfigError, TrainingFailed
from retrain_lib.core.records import Record
from retrain_lib.core.settings import ENV_SCRATCH

__all__ = ["TrainRequest", "TrainResult", "parse_result_line"]

_LIFTED_PARAMS = ("epochs", "imgsz", "batch", "seed")

CONTAINER_IMAGE_ENV = "AUTORETRAIN_CONTAINER_IMAGE"
"""Set by the Docker and Kubernetes runners inside the training: the image it runs in (with the
image id where the runner knows it), recorded on the MLflow run as ``container_image``."""


class TrainRequest(BaseModel):
    """Everything one training needs. Two equal requests are the same training (and resume)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(..., min_length=1, description="Dataset version: its folder or data.yaml, "
                      "as a local path, file:// or s3:// URI.")
    weights: str = Field(..., min_length=1, description="Initial weights: a .pt file (local, "
                         "file://, s3://), models:/<name>@<alias> or models:/<name>/<version>, "
                         "or an Ultralytics model YAML (e.g. yolo11n.yaml) to train from scratch.")
    out: str = Field(..., min_length=1, description="Where results go: a local directory or a "
                     "storage URI prefix such as s3://bucket/models/vehicle/<run>.")
    epochs: int = Field(30, ge=1, le=10_000, description="Epochs.")
    imgsz: int = Field(640, ge=32, le=8192, description="Training image size in pixels.")
    batch: int = Field(16, ge=1, le=1024, description="Batch size.")
    device: DeviceName = Field("cpu", description="'cpu' or CUDA device indexes such as '0' "
                               "or '0,1'.")
    workers: int = Field(2, ge=0, le=64, description="Dataloader workers (GPU only; Ultralytics "
                         "uses 0 on CPU).")
    seed: int = Field(0, description="Training seed.")
    plots: bool = Field(True, description="Let Ultralytics draw plots; they are uploaded too.")
    params: TrainArguments = Field(
        default_factory=dict, description="Further Ultralytics train arguments (a candidate's "
        "overrides), limited to retrain_lib.core.config.TRAIN_OVERRIDE_KEYS.")
    classes: list[str] | None = Field(
        None, description="Class names the object type expects, in index order. The dataset's "
        "data.yaml must list exactly these. None: take the dataset's names.")
    class_mismatch: Literal["adapt", "refuse"] = Field(
        "adapt", description="Weights trained for other classes: 'adapt' fine-tunes with a new "
        "detection head (rows of classes whose names match are carried over), 'refuse' stops.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: the MLFLOW_TRACKING_URI variable.")
    experiment: str = Field("autoretrain", min_length=1, description="MLflow experiment.")
    run_name: str | None = Field(None, description="MLflow run name; default derived from tags.")
    object_type: str | None = Field(None, description="Tag: object type, e.g. 'vehicle'.")
    dataset_version: str | None = Field(
        None, description="Tag: dataset version; default the dataset folder's name.")
    parent_model_version: str | None = Field(
        None, description="Tag: registered model version the weights came from.")
    cycle_id: str | None = Field(None, description="Tag: the retraining cycle (DAG run).")
    candidate: str | None = Field(None, description="Tag: hyper-parameter candidate name.")
    scratch: str | None = Field(
        None, description=f"Scratch root; default ${ENV_SCRATCH} or the system temp dir. Not "
        "part of the request's identity.")

    @model_validator(mode="before")
    @classmethod
    def _lift_first_class_params(cls, data: Any) -> Any:
        # A candidate's overrides may name epochs/imgsz/batch/seed; they become the fields, so
        # there is one value per setting and the request hash sees it once.
        if not isinstance(data, Mapping) or not isinstance(data.get("params"), Mapping):
            return data
        data = dict(data)
        params = dict(data["params"])
        for key in _LIFTED_PARAMS:
            if key in params:
                value = params.pop(key)
                if key in data and data[key] is not None and data[key] != value:
                    raise ValueError(f"params.{key}={value!r} contradicts {key}={data[key]!r}")
                data[key] = value
        data["params"] = params
        return data

    @field_validator("weights")
    @classmethod
    def _weights_kind(cls, value: str) -> str:
        if value.startswith("models:/") or value.lower().endswith((".pt", ".yaml", ".yml")):
            return value
        raise ValueError("must be a .pt weights file, a model YAML or a models:/ URI")

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one class")
            if len({v.strip().lower() for v in value}) != len(value):
                raise ValueError("class names must be unique")
        return value

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str = "train request") -> TrainRequest:
        """Validate a mapping; every problem is reported in one ConfigError."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(source, exc)) from None

    def identity(self) -> str:
        """Hash of everything that defines this training (not where its scratch lives)."""
        payload = self.model_dump_json(exclude={"scratch"})
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_argv(self) -> list[str]:
        """Command-line arguments of the entrypoint that reproduce this request."""
        argv: list[str] = []
        for name, value in self.model_dump(exclude_defaults=True).items():
            flag = "--" + name.replace("_", "-")
            if name == "params":
                argv += [arg for key, item in sorted(value.items())
                         for arg in ("--param", f"{key}={json.dumps(item)}")]
            elif name == "classes":
                argv += [flag, ",".join(value)]
            elif name == "plots":
                argv.append("--plots" if value else "--no-plots")
            else:
                argv += [flag, str(value)]
        return argv

    def default_run_name(self) -> str:
        """MLflow run name: the given one, else object type, candidate and cycle."""
        parts = [self.object_type, self.candidate, self.cycle_id]
        return self.run_name or "-".join(p for p in parts if p) or f"train-{self.identity()[:8]}"


class TrainResult(Record):
    """What a training produced; printed as the entrypoint's last line (:meth:`to_line`)."""

    mlflow_run_id: str
    weights_uri: str
    metrics: dict[str, float]
    epochs_run: int
    wall_time_s: float
    resumed: bool
    out_uri: str = ""
    model_source: str = ""
    """MLflow artifact URI of the run; register a model version with this as its source."""
    classes: tuple[str, ...] = ()
    weights_sha256: str = ""
    """SHA-256 of the weights file (also the run's ``weights_sha256`` tag)."""

    def to_line(self) -> str:
        """The result as one line of JSON."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        """The result of a parsed result line; keys a newer trainer adds are left out."""
        known = set(TrainResult.model_fields)
        return TrainResult.model_validate({k: v for k, v in data.items() if k in known})


def parse_result_line(output: str | Sequence[str]) -> TrainResult:
    """Find the result JSON in an entrypoint's output: its last line that is a result object.

    Raises:
        TrainingFailed: no line of the output is a result.
    """
    lines = output.splitlines() if isinstance(output, str) else list(output)
    for line in reversed(lines):
        text = line.strip()
        if not (text.startswith("{") and text.endswith("}")):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and {"mlflow_run_id", "weights_uri"} <= set(data):
            return TrainResult.from_dict(data)
    raise TrainingFailed("the training finished but printed no result JSON line",
                         logs="\n".join(lines[-40:]))


