"""The training entrypoint: fine-tune a YOLO detector on one dataset version.

Runs the same way as a local process, in the trainer container, or in a Kubernetes pod::

    python -m retrain_lib.train --data s3://bucket/datasets/vehicle/<version> \\
        --weights champion.pt --epochs 30 --imgsz 640 --batch 16 --device 0 \\
        --out s3://bucket/models/vehicle/<run> --mlflow-uri http://mlflow:5000

``autoretrain train`` is the same command. The last line printed on stdout is the result
JSON (:class:`TrainResult`). Everything the training writes goes under ``--out``, a scratch
directory and MLflow; nothing lands in the working directory.

A retry of the same request (after a crash, a kill or a lost worker) finds its scratch
directory again, resumes from Ultralytics' ``last.pt`` and keeps logging into the same MLflow
run. A retry after success returns the stored result without training again.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrain_lib import __version__
from retrain_lib.config import TRAIN_OVERRIDE_KEYS, format_validation_error
from retrain_lib.errors import ConfigError, InputError, RetrainError, StorageError, TrainingFailed
from retrain_lib.storage import Storage, open_storage

__all__ = [
    "ENV_SCRATCH",
    "WEIGHTS_ARTIFACT",
    "DatasetSummary",
    "TrainRequest",
    "TrainResult",
    "check_device",
    "main",
    "parse_result_line",
    "prepare_dataset",
    "train_model",
]

log = logging.getLogger(__name__)

ENV_SCRATCH = "AUTORETRAIN_SCRATCH"
"""Environment variable naming the scratch root (default: the system temp dir)."""
ENV_GIT_SHA = "AUTORETRAIN_GIT_SHA"
"""Set in the trainer image at build time, where no .git directory exists."""
ENV_TORCH_THREADS = "AUTORETRAIN_TORCH_THREADS"
"""CPU threads for torch; default: every CPU this process may use."""

WEIGHTS_ARTIFACT = "weights/best.pt"
"""Path of the best weights, both under ``--out`` and among the MLflow run's artifacts."""

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
DATA_FILE = "data.yaml"
FINAL_METRICS = {  # Ultralytics' validation keys -> the names evaluation and promotion use
    "metrics/mAP50-95(B)": "map50_95",
    "metrics/mAP50(B)": "map50",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}
# Ultralytics integrations that log on their own when enabled; training keeps them all off.
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard",
                 "wandb", "sync")
_FOREIGN_CALLBACK_MODULES = tuple(f"ultralytics.utils.callbacks.{n}" for n in (
    "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wb"))

ParamValue = bool | int | float | str | list[int]
_LIFTED_PARAMS = ("epochs", "imgsz", "batch", "seed")


# --------------------------------------------------------------------------------------
# Request and result
# --------------------------------------------------------------------------------------


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
    device: str = Field("cpu", description="'cpu' or CUDA device indexes such as '0' or '0,1'.")
    workers: int = Field(2, ge=0, le=64, description="Dataloader workers (GPU only; Ultralytics "
                         "uses 0 on CPU).")
    seed: int = Field(0, description="Training seed.")
    plots: bool = Field(True, description="Let Ultralytics draw plots; they are uploaded too.")
    params: dict[str, ParamValue] = Field(
        default_factory=dict, description="Further Ultralytics train arguments (a candidate's "
        "overrides), limited to retrain_lib.config.TRAIN_OVERRIDE_KEYS.")
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

    @field_validator("device")
    @classmethod
    def _device_format(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "cpu" and not all(p.isdigit() for p in value.split(",")):
            raise ValueError("must be 'cpu' or CUDA device indexes like '0' or '0,1'")
        return value

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, ParamValue]) -> dict[str, ParamValue]:
        unknown = sorted(set(value) - TRAIN_OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"unknown training argument(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(TRAIN_OVERRIDE_KEYS))}")
        return value

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


@dataclass(frozen=True)
class TrainResult:
    """What a training produced; printed as the entrypoint's last line."""

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

    def to_json(self) -> str:
        """One-line JSON."""
        data = asdict(self)
        data["classes"] = list(self.classes)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        """Inverse of :meth:`to_json` (after json.loads)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["classes"] = tuple(values.get("classes", ()))
        values["metrics"] = {k: float(v) for k, v in values.get("metrics", {}).items()}
        return cls(**values)


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


# --------------------------------------------------------------------------------------
# Dataset versions: data.yaml + image lists + images/ and labels/
# --------------------------------------------------------------------------------------


class _DatasetSource(ABC):
    """Read-only access to the files of one dataset version, by path relative to its folder."""

    description: str

    @abstractmethod
    def read_text(self, rel: str) -> str:
        """Text of a file; InputError/StorageError when missing."""

    @abstractmethod
    def list_files(self, rel_dir: str) -> list[str]:
        """Relative paths of every file under a folder (recursive)."""

    @abstractmethod
    def existing(self, rels: Sequence[str]) -> set[str]:
        """The subset of ``rels`` that exist."""

    @abstractmethod
    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        """Make each file available locally at ``dest_of(rel)`` (symlink or download)."""

    @property
    @abstractmethod
    def version_name(self) -> str:
        """Name of the dataset folder (the default dataset version)."""


def _norm_rel(rel: str, where: str) -> str:
    rel = rel.strip().replace("\\", "/")
    rel = rel.removeprefix("./")
    if not rel or rel.startswith("/"):
        raise InputError(f"{where}: {rel!r} must be a path relative to the dataset folder")
    return posixpath.normpath(rel)


class _LocalSource(_DatasetSource):
    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.description = str(self.folder)

    def _path(self, rel: str) -> Path:
        return self.folder / rel

    def read_text(self, rel: str) -> str:
        path = self._path(rel)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None

    def list_files(self, rel_dir: str) -> list[str]:
        base = self._path(rel_dir)
        if not base.is_dir():
            raise InputError(f"{base}: image folder not found")
        return sorted(posixpath.join(rel_dir, p.relative_to(base).as_posix())
                      for p in base.rglob("*") if p.is_file())

    def existing(self, rels: Sequence[str]) -> set[str]:
        return {r for r in rels if self._path(r).is_file()}

    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        # Symlinks: no copy of the chips, and Ultralytics' label cache lands in scratch instead
        # of inside the immutable dataset version.
        for rel in rels:
            dest = dest_of(rel)
            if dest.is_symlink() or dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(self._path(rel).resolve(), dest)

    @property
    def version_name(self) -> str:
        return self.folder.name


class _StorageSource(_DatasetSource):
    """A dataset folder in S3 (or any Storage), addressed from the bucket root."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.description = storage.url(self.prefix) if self.prefix else storage.uri

    def _key(self, rel: str) -> str:
        key = posixpath.normpath(posixpath.join(self.prefix, rel))
        if key.startswith("..") or key.startswith("/"):
            raise InputError(f"{self.description}: {rel!r} points outside the bucket")
        return key

    def read_text(self, rel: str) -> str:
        data = self.storage.get_bytes(self._key(rel))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            url = self.storage.url(self._key(rel))
            raise InputError(f"{url}: not UTF-8 text ({exc})") from None

    def list_files(self, rel_dir: str) -> list[str]:
        base = self._key(rel_dir)
        keys = self.storage.list(base)
        if not keys:
            raise InputError(f"{self.storage.url(base)}: image folder is empty or missing")
        return sorted(posixpath.join(rel_dir, k[len(base) + 1:]) for k in keys)

    def existing(self, rels: Sequence[str]) -> set[str]:
        # One listing per folder instead of one request per file.
        by_dir: dict[str, list[str]] = {}
        for rel in rels:
            by_dir.setdefault(posixpath.dirname(self._key(rel)), []).append(rel)
        found: set[str] = set()
        for folder, members in by_dir.items():
            keys = set(self.storage.list(folder))
            found.update(r for r in members if self._key(r) in keys)
        return found

    def fetch(self, rels: Sequence[str], dest_of: Callable[[str], Path]) -> None:
        todo = [r for r in rels if not dest_of(r).exists()]  # a retry downloads only what's new

        def one(rel: str) -> None:
            self.storage.get_file(self._key(rel), dest_of(rel))

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(one, todo))

    @property
    def version_name(self) -> str:
        return posixpath.basename(self.prefix) or "dataset"


def _open_dataset(data: str) -> tuple[_DatasetSource, str]:
    """The dataset source and the name of its data.yaml, from a folder or data.yaml location."""
    is_yaml = data.lower().endswith((".yaml", ".yml"))
    if data.startswith("s3://"):
        bucket, _, key = data[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"--data {data}: the bucket name is missing")
        key = key.strip("/")
        folder, name = (posixpath.dirname(key), posixpath.basename(key)) if is_yaml else (key,
                                                                                         DATA_FILE)
        return _StorageSource(open_storage(f"s3://{bucket}"), folder), name
    if "://" in data and not data.startswith("file://"):
        raise ConfigError(f"--data {data}: unsupported location; use a local path, file:// or "
                          "s3://bucket/prefix")
    if data.startswith("file://"):
        from urllib.parse import unquote, urlparse

        data = unquote(urlparse(data).path)
    path = Path(data).expanduser()
    if is_yaml:
        return _LocalSource(path.parent), path.name
    return _LocalSource(path), DATA_FILE


def _label_rel(image_rel: str) -> str:
    # Ultralytics' rule: the last 'images' folder becomes 'labels', the suffix becomes .txt.
    head, sep, tail = ("/" + image_rel).rpartition("/images/")
    if not sep:
        raise InputError(f"image {image_rel!r} is not inside a folder named 'images'; YOLO "
                         "datasets keep labels at the same path with 'images' -> 'labels'")
    label = f"{head}/labels/{tail}".lstrip("/")
    return label.rsplit(".", 1)[0] + ".txt"


def _dest_rel(rel: str) -> str:
    # '..' segments stay unique but cannot climb out of the scratch folder.
    return "/".join("_up" if part == ".." else part for part in rel.split("/"))


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset version as training sees it, after checking it."""

    location: str
    version: str
    names: tuple[str, ...]
    train_images: int
    """Entries of the train list, repeats (oversampling) included."""
    val_images: int
    train_instances: tuple[int, ...]
    val_instances: tuple[int, ...]
    data_yaml: Path
    """The rewritten data.yaml in scratch, with absolute paths."""


def _parse_names(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        try:
            indexed = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise InputError(f"{where}: names: keys must be class indexes 0..n-1") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise InputError(f"{where}: names: indexes must be 0..{len(indexed) - 1} without gaps")
        names = [indexed[i] for i in range(len(indexed))]
    else:
        raise InputError(f"{where}: names: expected a list of class names, got "
                         f"{type(raw).__name__}")
    if not names:
        raise InputError(f"{where}: names: the dataset lists no classes")
    return tuple(names)


def _split_images(source: _DatasetSource, spec: Any, split: str, where: str) -> list[str]:
    specs = spec if isinstance(spec, list) else [spec]
    images: list[str] = []
    for item in specs:
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"{where}: {split}: expected a list file (.txt) or a folder, got "
                             f"{item!r}")
        rel = _norm_rel(item, f"{where}: {split}")
        if rel.lower().endswith(".txt"):
            list_where = f"{source.description}/{rel}"
            for number, line in enumerate(source.read_text(rel).splitlines(), start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    images.append(_norm_rel(line, f"{list_where} line {number}"))
        else:
            images.extend(p for p in source.list_files(rel)
                          if posixpath.splitext(p)[1].lower() in IMAGE_SUFFIXES)
    return images


def _count_labels(path: Path, nc: int, names: Sequence[str], where: str) -> list[int]:
    counts = [0] * nc
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: cannot read label file ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"{where} line {number}: expected 'class x_center y_center width "
                             f"height' numbers, got {line.strip()!r}") from None
        if len(values) < 5 or values[0] != int(values[0]):
            raise InputError(f"{where} line {number}: expected 'class x_center y_center width "
                             f"height' with an integer class, got {line.strip()!r}")
        cls = int(values[0])
        if not 0 <= cls < nc:
            raise InputError(f"{where} line {number}: class id {cls} but the dataset has {nc} "
                             f"class(es) ({', '.join(names)}); class-count mismatch between "
                             "labels and data.yaml")
        counts[cls] += 1
    return counts


def prepare_dataset(data: str, scratch: Path, classes: Sequence[str] | None = None,
                    version: str | None = None) -> DatasetSummary:
    """Check a dataset version and lay it out in ``scratch`` for Ultralytics.

    Local images are symlinked, remote ones downloaded (a retry fetches only what is missing).
    The returned data.yaml uses absolute paths, so Ultralytics resolves nothing against the
    working directory.

    Raises:
        InputError: data.yaml is malformed, a listed image is missing, labels use class ids
            outside the class list, a split has no labelled object, or the classes differ from
            ``classes``.
        StorageError: the dataset's storage cannot be reached.
    """
    source, data_name = _open_dataset(data)
    where = f"{source.description}/{data_name}"
    try:
        spec = yaml.safe_load(source.read_text(data_name))
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected a mapping with train, val and names")
    for key in ("train", "val", "names"):
        if key not in spec:
            raise InputError(f"{where}: '{key}' is missing (see the dataset-version contract "
                             "in docs/training.md)")
    names = _parse_names(spec["names"], where)
    if "nc" in spec and spec["nc"] != len(names):
        raise InputError(f"{where}: nc is {spec['nc']} but names lists {len(names)} classes "
                         f"({', '.join(names)}); class-count mismatch")
    if classes is not None and tuple(classes) != names:
        raise InputError(f"{where}: the dataset's classes [{', '.join(names)}] differ from the "
                         f"object type's classes [{', '.join(classes)}] ({len(names)} vs "
                         f"{len(classes)}); class-count or order mismatch — rebuild the dataset "
                         "version for the current object-type config")
    nc = len(names)
    root = scratch / "data"
    files = root / "files"
    summary: dict[str, tuple[int, list[int]]] = {}
    for split in ("train", "val"):
        # Repeated entries are the dataset's oversampling: they stay in the list Ultralytics
        # reads, while each file is checked and fetched once.
        entries = _split_images(source, spec[split], split, where)
        images = list(dict.fromkeys(entries))
        if not images:
            raise InputError(f"{where}: the {split} split lists no images")
        bad = [i for i in images if posixpath.splitext(i)[1].lower() not in IMAGE_SUFFIXES]
        if bad:
            raise InputError(f"{where}: {split}: {bad[0]!r} is not an image "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        labels = {img: _label_rel(img) for img in images}
        present_images = source.existing(images)
        missing = [i for i in images if i not in present_images]
        if missing:
            raise InputError(f"{where}: {split}: {len(missing)} listed image(s) do not exist, "
                             f"e.g. {source.description}/{missing[0]}")
        present_labels = source.existing(list(labels.values()))
        if not present_labels:
            raise InputError(f"{where}: the dataset has no labels: none of the {len(images)} "
                             f"{split} images has a label file (expected e.g. "
                             f"{source.description}/{labels[images[0]]})")
        source.fetch([*images, *sorted(present_labels)], lambda rel: files / _dest_rel(rel))
        repeats = Counter(entries)
        counts = [0] * nc
        for image, label in labels.items():
            if label in present_labels:
                found = _count_labels(files / _dest_rel(label), nc, names,
                                      f"{source.description}/{label}")
                for i, n in enumerate(found):
                    counts[i] += n * repeats[image]
        if not sum(counts):
            raise InputError(f"{where}: the dataset has no labels: the {split} split's "
                             f"{len(present_labels)} label file(s) contain no objects")
        (root / f"{split}.txt").write_text(
            "".join(f"{files / _dest_rel(img)}\n" for img in entries), encoding="utf-8")
        summary[split] = (len(entries), counts)
    data_yaml = root / DATA_FILE
    data_yaml.write_text(yaml.safe_dump({
        "path": str(root), "train": str(root / "train.txt"), "val": str(root / "val.txt"),
        "nc": nc, "names": dict(enumerate(names)),
    }, sort_keys=False), encoding="utf-8")
    return DatasetSummary(
        location=where, version=version or source.version_name, names=names,
        train_images=summary["train"][0], val_images=summary["val"][0],
        train_instances=tuple(summary["train"][1]), val_instances=tuple(summary["val"][1]),
        data_yaml=data_yaml)


# --------------------------------------------------------------------------------------
# Weights, device, environment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    path: str
    """What Ultralytics loads: a local .pt path or a model YAML (path or built-in name)."""
    names: tuple[str, ...] | None
    """The classes the weights were trained for; None for a model YAML."""
    parent_version: str | None = None


def _resolve_weights(spec: str, scratch: Path, tracking_uri: str) -> _Weights:
    if spec.lower().endswith((".yaml", ".yml")):
        local = Path(spec).expanduser()
        if "/" in spec and not local.is_file():
            raise InputError(f"--weights {spec}: model YAML not found")
        return _Weights(str(local) if local.is_file() else spec, None)
    parent_version = None
    target = scratch / "weights" / "initial.pt"
    if spec.startswith("models:/"):
        parent_version = _download_registered(spec, target, tracking_uri)
        path = target
    elif spec.startswith(("s3://", "file://")):
        base, _, name = spec.rpartition("/")
        if not target.exists():
            open_storage(base).get_file(name, target)
        path = target
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"--weights {spec}: weights file not found (downloads of named "
                             "weights are not attempted; give a path, a storage URI or a "
                             "model YAML)")
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path))
        model = ckpt.get("ema") or ckpt["model"]
        names = model.names
    except Exception as exc:  # any unpickling problem means the file is not usable weights
        raise InputError(f"{spec}: not an Ultralytics weights file ({type(exc).__name__}: "
                         f"{exc})") from None
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    return _Weights(str(path), tuple(str(n) for n in names), parent_version)


def _download_registered(uri: str, target: Path, tracking_uri: str) -> str:
    """Download ``weights/best.pt`` of a registered model version; returns the version."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/"):]
    client = MlflowClient(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.partition("/")
            version = client.get_model_version(name, number)
        if not target.exists():
            # The version's source is the training run's artifact root (see docs/training.md).
            source = client.get_model_version_download_uri(name, version.version)
            got = download_artifacts(artifact_uri=f"{source.rstrip('/')}/{WEIGHTS_ARTIFACT}",
                                     dst_path=str(target.parent / "download"),
                                     tracking_uri=tracking_uri)
            Path(got).replace(target)
    except MlflowException as exc:
        raise InputError(f"--weights {uri}: cannot resolve the registered model ({exc.message})"
                         ) from None
    return str(version.version)


def check_device(device: str) -> None:
    """Fail early, with the reason, when a CUDA device is requested but not usable here."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: CUDA was requested but no CUDA device is available here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use "
            "--device cpu, or run on a GPU host (docker runner with gpus > 0)")
    wanted = [int(i) for i in device.split(",")]
    count = torch.cuda.device_count()
    if max(wanted) >= count:
        raise ConfigError(f"device {device!r}: only {count} CUDA device(s) are visible "
                          f"(indexes 0..{count - 1})")


def _code_version() -> tuple[str, str | None]:
    sha = os.environ.get(ENV_GIT_SHA) or _git_sha(Path(__file__).resolve().parents[1] / ".git")
    return (f"{__version__}+g{sha[:12]}" if sha else __version__), sha


def _git_sha(git_dir: Path) -> str | None:
    # Read the checkout's HEAD directly: no git binary needed, nothing executed.
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[len("ref: "):]
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip() or None
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        return None
    return None


def _torch_threads() -> int:
    value = os.environ.get(ENV_TORCH_THREADS)
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ConfigError(f"{ENV_TORCH_THREADS}={value!r}: expected a positive integer"
                              ) from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _ultralytics_integrations_off() -> Iterator[None]:
    """Switch Ultralytics' own loggers (MLflow, TensorBoard, ...) off, in memory only.

    Ultralytics enables its MLflow callback whenever mlflow is importable; it would open a
    second run (or write ./mlruns). Settings are changed without persisting them, so the
    user's Ultralytics settings file stays as it was.
    """
    from ultralytics.utils import SETTINGS

    saved = {k: SETTINGS[k] for k in _INTEGRATIONS if k in SETTINGS}
    for key in saved:
        dict.__setitem__(SETTINGS, key, False)
    try:
        yield
    finally:
        for key, value in saved.items():
            dict.__setitem__(SETTINGS, key, value)


def _drop_foreign_loggers(trainer: Any) -> None:
    """Second guard: remove integration callbacks that got registered anyway."""
    for event, funcs in trainer.callbacks.items():
        kept = [f for f in funcs if not getattr(f, "__module__", "").startswith(
            _FOREIGN_CALLBACK_MODULES)]
        if len(kept) != len(funcs):
            log.warning("removed %d Ultralytics integration callback(s) from %s",
                        len(funcs) - len(kept), event)
            funcs[:] = kept


# --------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------


def _tracking_uri(request: TrainRequest) -> str:
    uri = request.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no MLflow tracking URI: pass --mlflow-uri (e.g. http://mlflow:5000 "
                          "or sqlite:////abs/path/mlflow.db) or set MLFLOW_TRACKING_URI")
    if uri.startswith(("http://", "https://")):
        _check_http_reachable(uri)
    return uri


def _check_http_reachable(uri: str) -> None:
    # MLflow's client retries for minutes against a dead server; fail in seconds instead.
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            pass
    except urllib.error.HTTPError:
        return  # something answers; MLflow reports real API problems itself
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(f"MLflow tracking server {uri} cannot be reached ({reason})") from None


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it or choose "
                              "another --experiment")
        return str(found.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # MLflow's default artifact root for a database store is ./mlartifacts in the working
        # directory; keep artifacts beside the database instead.
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created concurrently by a sibling candidate
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _metric_name(column: str) -> str:
    name = column.strip()
    final = FINAL_METRICS.get(name)
    if final:
        return f"val/{final}"
    return {"time": "train/elapsed_s"}.get(name, name.replace("(B)", ""))


def _read_results_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k.strip(): float(v) for k, v in row.items() if k and v not in
                             (None, "")})
            except ValueError:
                continue  # a row cut short by a kill
    return rows


class _EpochLogger:
    """Logs each epoch's results.csv row to MLflow exactly once, also across resumption."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        history = client.get_metric_history(run_id, "epoch")
        self.logged = int(max((m.step for m in history), default=0))

    def __call__(self, trainer: Any) -> None:
        self.log_rows(Path(trainer.csv))

    def log_rows(self, csv_path: Path) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for row in _read_results_csv(csv_path):
            epoch = int(row.get("epoch", 0))
            if epoch <= self.logged:
                continue
            metrics = [Metric("epoch", float(epoch), now, epoch)]
            metrics += [Metric(_metric_name(k), v, now, epoch) for k, v in row.items()
                        if k != "epoch"]
            # One batch per epoch: it is stored or not, so a kill never leaves half an epoch.
            self.client.log_batch(self.run_id, metrics=metrics)
            self.logged = epoch


# --------------------------------------------------------------------------------------
# Scratch state (resumption)
# --------------------------------------------------------------------------------------


class _Scratch:
    """The deterministic working folder of one request, found again by a retry."""

    def __init__(self, request: TrainRequest) -> None:
        root = Path(request.scratch or os.environ.get(ENV_SCRATCH)
                    or Path(tempfile.gettempdir()) / "autoretrain-train").expanduser()
        self.dir = root / f"train-{request.identity()[:20]}"
        self.state_file = self.dir / "state.json"
        self.result_file = self.dir / "result.json"
        self.save_dir = self.dir / "ultralytics" / "train"
        self._lock: Any = None

    def lock(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.dir}: cannot create the scratch directory ({exc})") from None
        self._lock = open(self.dir / "lock", "w")  # noqa: SIM115 - held for the whole training
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingFailed(f"another process is running the same training right now "
                                 f"(lock {self.dir / 'lock'})") from None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update(self, **values: Any) -> None:
        state = {**self.state(), **values}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)

    def wipe(self) -> None:
        for child in self.dir.iterdir() if self.dir.is_dir() else []:
            if child.name == "lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def clean_after_success(self) -> None:
        # Keep only what a replay needs (state and result); drop chips and checkpoints.
        for name in ("data", "ultralytics", "weights"):
            shutil.rmtree(self.dir / name, ignore_errors=True)


def _resumable(last: Path) -> bool:
    if not last.is_file():
        return False
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(last))
    except Exception:  # a checkpoint cut short by a kill
        return False
    return ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None


# --------------------------------------------------------------------------------------
# The training
# --------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Mutable bookkeeping of one invocation."""

    request: TrainRequest
    scratch: _Scratch
    tracking_uri: str
    started: float = field(default_factory=time.monotonic)
    resumed: bool = False


def train_model(request: TrainRequest, *, fresh: bool = False) -> TrainResult:
    """Fine-tune a detector as ``request`` says; log one MLflow run; upload the results.

    Args:
        request: what to train.
        fresh: forget an earlier, interrupted attempt of the same request and start over.

    Raises:
        ConfigError: bad settings (no tracking URI, CUDA requested but absent, ...).
        InputError: unusable dataset or weights.
        StorageError: storage or the MLflow server cannot be reached.
        TrainingFailed: Ultralytics failed while training.
    """
    check_device(request.device)
    tracking_uri = _tracking_uri(request)
    scratch = _Scratch(request)
    scratch.lock()
    try:
        if fresh:
            scratch.wipe()
        run = _Run(request, scratch, tracking_uri)
        done = _replay(run)
        return done if done is not None else _train(run)
    finally:
        scratch.unlock()


def _replay(run: _Run) -> TrainResult | None:
    """The stored result of an earlier, finished attempt, if its weights are still there."""
    state = run.scratch.state()
    if state.get("status") != "done" or not run.scratch.result_file.is_file():
        return None
    stored = TrainResult.from_dict(json.loads(run.scratch.result_file.read_text()))
    if not open_storage(run.request.out).exists(WEIGHTS_ARTIFACT):
        log.warning("earlier result found but %s is gone; training again", stored.weights_uri)
        run.scratch.wipe()
        return None
    log.info("this training already finished (MLflow run %s); returning its result",
             stored.mlflow_run_id)
    return TrainResult(**{**asdict(stored), "resumed": True,
                          "wall_time_s": round(time.monotonic() - run.started, 3)})


def _check_out_writable(storage: Storage) -> None:
    # Hours of training must not end in 'cannot upload': probe the destination first.
    probe = ".autoretrain-write-probe"
    storage.put_bytes(probe, b"ok")
    storage.delete(probe)


def _train(run: _Run) -> TrainResult:
    request, scratch = run.request, run.scratch
    out = open_storage(request.out)
    _check_out_writable(out)
    dataset = prepare_dataset(request.data, scratch.dir, request.classes,
                              request.dataset_version)
    log.info("dataset %s: %d train / %d val images, classes %s", dataset.location,
             dataset.train_images, dataset.val_images, ", ".join(dataset.names))
    weights = _resolve_weights(request.weights, scratch.dir, run.tracking_uri)
    adapted = weights.names is not None and weights.names != dataset.names
    if adapted:
        _check_class_change(request, weights, dataset)

    trained = scratch.state().get("status") == "trained"
    resume = not trained and _resumable(scratch.save_dir / "weights" / "last.pt")
    run.resumed = resume or trained
    tracking = _Tracking(run, dataset, weights, adapted)
    try:
        if not trained:
            metrics = _fit(run, dataset, weights, resume, tracking)
            tracking.wait()  # its state update must land before ours
            scratch.update(status="trained", metrics=metrics)
        else:
            tracking.start()
            tracking.wait()
        metrics = scratch.state()["metrics"]
        log.info("training done; uploading results to %s", out.uri)
        assert tracking.epoch_logger is not None
        tracking.epoch_logger.log_rows(scratch.save_dir / "results.csv")
        result = _publish(run, tracking.client, tracking.run_id, out, metrics, dataset)
    except BaseException as exc:
        tracking.finish("KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit)
                        else "FAILED")
        raise
    tracking.finish("FINISHED")
    scratch.result_file.write_text(result.to_json())
    scratch.update(status="done")
    scratch.clean_after_success()
    return result


class _Tracking:
    """The MLflow side of one training, set up in a background thread.

    Importing mlflow and opening its store cost seconds of CPU; started once Ultralytics is
    imported, that work overlaps with the trainer's start-up and first epoch, whose tensor
    work runs outside the GIL. The first epoch-end callback waits for it, so metrics are
    never lost, and a tracking failure stops the training there.
    """

    def __init__(self, run: _Run, dataset: DatasetSummary, weights: _Weights,
                 adapted: bool) -> None:
        self.run = run
        self.dataset = dataset
        self.weights = weights
        self.adapted = adapted
        self.client: Any = None
        self.run_id = ""
        self.epoch_logger: _EpochLogger | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._setup, name="autoretrain-mlflow",
                                        daemon=True)

    def start(self) -> None:
        """Begin connecting (once)."""
        if not self._thread.is_alive() and not self._thread.ident:
            self._thread.start()

    def wait(self) -> None:
        """Block until the run is ready; re-raise what went wrong while setting it up."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def log_epoch(self, trainer: Any) -> None:
        """Ultralytics' on_fit_epoch_end callback."""
        self.wait()
        assert self.epoch_logger is not None
        self.epoch_logger(trainer)

    def finish(self, status: str) -> None:
        """End the run with ``status``; on the failure paths never raise."""
        if not self._thread.ident:
            return
        self._thread.join()
        if not self.run_id:
            return
        if status == "FINISHED":
            self.client.set_terminated(self.run_id, status=status)
            return
        with contextlib.suppress(Exception):
            self.client.set_terminated(self.run_id, status=status)

    def _setup(self) -> None:
        try:
            self._connect()
        except BaseException as exc:  # handed to the main thread by wait()
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException | OSError) and not isinstance(exc, RetrainError):
                exc = StorageError(f"MLflow at {self.run.tracking_uri}: {exc}")
            self._error = exc

    def _connect(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        run, request, dataset = self.run, self.run.request, self.dataset
        client = MlflowClient(run.tracking_uri)
        experiment_id = _experiment_id(client, request.experiment, run.tracking_uri)
        state = run.scratch.state()
        run_id = _mlflow_run(client, experiment_id, state, request.default_run_name(),
                             continuing=run.resumed)
        run.scratch.update(mlflow_run_id=run_id, status=state.get("status", "training"),
                           request=request.model_dump())
        code_version, sha = _code_version()
        tags = {
            "object_type": request.object_type or "",
            "dataset_version": dataset.version,
            "parent_model_version": request.parent_model_version
            or self.weights.parent_version or "",
            "cycle_id": request.cycle_id or "",
            "candidate": request.candidate or "",
            "code_version": code_version,
            "class_names": ",".join(dataset.names),
            "head_adapted": str(self.adapted).lower(),
            "autoretrain.request_hash": request.identity()[:20],
        }
        if sha:
            tags["mlflow.source.git.commit"] = sha
        params = {
            "data": request.data, "weights": request.weights, "epochs": request.epochs,
            "imgsz": request.imgsz, "batch": request.batch, "device": request.device,
            "workers": request.workers, "seed": request.seed, "nc": len(dataset.names),
            "train_images": dataset.train_images, "val_images": dataset.val_images,
            "train_instances": ",".join(map(str, dataset.train_instances)),
            **{k: json.dumps(v) if isinstance(v, list) else v
               for k, v in request.params.items()},
        }
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items() if v != ""])
        self.epoch_logger = _EpochLogger(client, run_id)
        self.client, self.run_id = client, run_id
        log.info("MLflow run %s in experiment %r at %s", run_id, request.experiment,
                 run.tracking_uri)


def _check_class_change(request: TrainRequest, weights: _Weights,
                        dataset: DatasetSummary) -> None:
    assert weights.names is not None
    old, new = list(weights.names), list(dataset.names)
    kept = [n for n in new if n in old]
    change = (f"weights {request.weights} were trained for {len(old)} class(es) "
              f"[{', '.join(old)}] but the dataset has {len(new)} [{', '.join(new)}]")
    if request.class_mismatch == "refuse":
        raise InputError(f"{change}; refusing (class_mismatch=refuse). Use class_mismatch=adapt "
                         "to fine-tune with a new detection head, or train from a model YAML")
    log.warning("%s; adapting: new detection head, %d class(es) carried over by name (%s), "
                "%d new", change, len(kept), ", ".join(kept) or "none", len(new) - len(kept))


def _mlflow_run(client: Any, experiment_id: str, state: dict[str, Any], run_name: str, *,
                continuing: bool) -> str:
    """The run of this training: the earlier attempt's when it can be continued, else new."""
    from mlflow.exceptions import MlflowException

    run_id = state.get("mlflow_run_id")
    if run_id:
        try:
            existing = client.get_run(run_id)
        except MlflowException:
            existing = None
        if existing is not None and existing.info.lifecycle_stage == "active":
            logged = client.get_metric_history(run_id, "epoch")
            if continuing or not logged:
                if existing.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                return run_id
            # Training restarts from scratch (no usable last.pt): a clean run, and the old one
            # says why it ended.
            client.set_tag(run_id, "autoretrain.superseded", "restarted without a checkpoint")
            client.set_terminated(run_id, status="FAILED")
    created = client.create_run(experiment_id, run_name=run_name)
    return str(created.info.run_id)


def _fit(run: _Run, dataset: DatasetSummary, weights: _Weights, resume: bool,
         tracking: _Tracking) -> dict[str, float]:
    """Run Ultralytics; returns the final validation metrics of best.pt."""
    request = run.request
    # polars: Ultralytics imports it at the first epoch end anyway; importing it here keeps
    # the tracking thread and this one from importing it at the same moment.
    import polars  # noqa: F401
    import torch
    from ultralytics import YOLO

    tracking.start()
    threads = torch.get_num_threads()
    if request.device == "cpu":
        # Ultralytics leaves one core idle on import; training uses them all.
        torch.set_num_threads(_torch_threads())
    args: dict[str, Any] = {
        "data": str(dataset.data_yaml), "device": request.device, "workers": request.workers,
        "plots": request.plots, "imgsz": request.imgsz, "batch": request.batch,
    }
    if resume:
        last = run.scratch.save_dir / "weights" / "last.pt"
        log.info("resuming from %s", last)
        model = YOLO(str(last))
        args["resume"] = True
    else:
        model = YOLO(weights.path)
        args.update(
            epochs=request.epochs, seed=request.seed, project=str(run.scratch.save_dir.parent),
            name=run.scratch.save_dir.name, exist_ok=True, verbose=True, **request.params)
    model.add_callback("on_pretrain_routine_start", _drop_foreign_loggers)
    model.add_callback("on_fit_epoch_end", tracking.log_epoch)
    try:
        with _ultralytics_integrations_off():
            model.train(**args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except RetrainError:
        raise
    except Exception as exc:
        raise TrainingFailed(f"Ultralytics training failed: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)  # this process may run other work afterwards
    trainer = model.trainer
    raw = dict(getattr(trainer, "metrics", None) or {})
    return {name: round(float(raw[key]), 6) for key, name in FINAL_METRICS.items() if key in raw}


def _publish(run: _Run, client: Any, run_id: str, out: Storage, metrics: dict[str, float],
             dataset: DatasetSummary) -> TrainResult:
    """Upload weights, results and plots to ``out`` and MLflow; build the result."""
    save_dir = run.scratch.save_dir
    best = save_dir / "weights" / "best.pt"
    if not best.is_file():
        best = save_dir / "weights" / "last.pt"
    if not best.is_file():
        raise TrainingFailed(f"training ended without weights in {save_dir / 'weights'}")
    request_file = run.scratch.dir / "request.json"
    request_file.write_text(run.request.model_dump_json(indent=2))
    uploads: list[tuple[Path, str]] = [(best, WEIGHTS_ARTIFACT), (request_file, "request.json")]
    for name in ("results.csv", "args.yaml"):
        if (save_dir / name).is_file():
            uploads.append((save_dir / name, name))
    for plot in sorted([*save_dir.glob("*.png"), *save_dir.glob("*.jpg")]):
        uploads.append((plot, f"plots/{plot.name}"))
    for path, key in uploads:
        out.put_file(path, key)
        client.log_artifact(run_id, str(path), artifact_path=posixpath.dirname(key) or None)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"final/{k}", v, now, 0) for k, v in
                                      metrics.items()])
    rows = _read_results_csv(save_dir / "results.csv")
    result = TrainResult(
        mlflow_run_id=run_id, weights_uri=out.url(WEIGHTS_ARTIFACT), metrics=metrics,
        epochs_run=int(max((r.get("epoch", 0) for r in rows), default=0)),
        wall_time_s=round(time.monotonic() - run.started, 3), resumed=run.resumed,
        out_uri=out.uri, model_source=client.get_run(run_id).info.artifact_uri,
        classes=dataset.names)
    out.put_bytes("result.json", (result.to_json() + "\n").encode("utf-8"))
    return result


# --------------------------------------------------------------------------------------
# Command line (shared with `autoretrain train`)
# --------------------------------------------------------------------------------------


def parse_param(text: str) -> tuple[str, ParamValue]:
    """``key=value`` with a YAML-typed value (0.01 -> float, true -> bool, [0,1] -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--param {text!r}: expected key=value, e.g. lr0=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def run_cli(options: Mapping[str, Any], *, fresh: bool = False,
            result_file: str | Path | None = None) -> TrainResult:
    """Build the request from command-line options, train, print the result JSON last."""
    _configure_logging()
    values = {k: v for k, v in options.items() if v is not None}
    request = TrainRequest.parse(values, "train options")
    previous = _install_sigterm()
    try:
        result = train_model(request, fresh=fresh)
    finally:
        _restore_sigterm(previous)
    if result_file is not None:
        target = Path(result_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(result.to_json() + "\n", encoding="utf-8")
    sys.stderr.flush()
    sys.stdout.flush()
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    return result


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _install_sigterm() -> Any:
    # Airflow and Docker stop a task with SIGTERM; turn it into an exception so the MLflow run
    # is marked KILLED and the scratch lock released (a retry then resumes).
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m retrain_lib.train``: the same options as ``autoretrain train``."""
    import typer

    from retrain_lib.cli import train as train_command

    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(train_command)
    single(args=list(sys.argv[1:] if argv is None else argv),
           prog_name="python -m retrain_lib.train")


if __name__ == "__main__":
    main()
