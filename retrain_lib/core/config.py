"""Object-type configuration: one strict YAML file per object type.

``configs/object_types/<name>.yaml`` describes everything a retraining cycle needs for one
object type: its classes, schedule, trigger policy, tiling, training candidates, mining,
dataset policy, promotion gate and runner. Unknown keys are errors, and every error names the
file, the field path, the value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from retrain_lib.core.classes import ClassMapper
from retrain_lib.core.device import DeviceName
from retrain_lib.core.errors import ConfigError

__all__ = [
    "SCHEMA_VERSION",
    "TRAIN_OVERRIDE_KEYS",
    "CandidateConfig",
    "ConfigFolder",
    "DatasetConfig",
    "DockerRunnerConfig",
    "GuardMetric",
    "IngestConfig",
    "KubernetesRunnerConfig",
    "KubernetesToleration",
    "MiningConfig",
    "ObjectTypeConfig",
    "PromotionConfig",
    "RunnerConfig",
    "TilingConfig",
    "TrainArgument",
    "TrainArguments",
    "TrainingConfig",
    "TriggerPolicy",
    "load_object_type_config",
    "load_object_type_configs",
    "read_object_type_configs",
]

SCHEMA_VERSION: Literal[1] = 1

SCHEDULE_PRESETS = frozenset(
    {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
)

# Metrics produced by evaluation that promotion may compare on.
METRIC_NAMES = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
                "precision", "recall")
MetricName = Literal["map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
                     "precision", "recall"]

# Ultralytics train arguments a candidate may override. Anything else is a typo.
TRAIN_OVERRIDE_KEYS = frozenset({
    "epochs", "imgsz", "batch", "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs",
    "optimizer", "cos_lr", "patience", "freeze", "mosaic", "mixup", "degrees", "translate",
    "scale", "shear", "flipud", "fliplr", "hsv_h", "hsv_s", "hsv_v", "close_mosaic",
    "box", "cls", "dfl", "dropout", "seed",
})

TrainArgument = bool | int | float | str | list[int]
"""The value of one Ultralytics train argument."""


def _known_train_arguments(value: dict[str, TrainArgument]) -> dict[str, TrainArgument]:
    unknown = sorted(set(value) - TRAIN_OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"unknown training argument(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(TRAIN_OVERRIDE_KEYS))}")
    return value


TrainArguments = Annotated[dict[str, TrainArgument], AfterValidator(_known_train_arguments)]
"""Ultralytics train arguments, limited to :data:`TRAIN_OVERRIDE_KEYS`."""

_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TriggerPolicy(StrictModel):
    """When a scheduled cycle actually retrains."""

    min_new_annotations: int = Field(
        50, ge=0, description="Retrain once at least this many new annotated objects arrived "
        "since the last training.")
    max_days_without_training: int | None = Field(
        14, ge=1, description="Retrain after this many days even with little new data "
        "(null: never force).")


class TilingConfig(StrictModel):
    """How scenes are cut into training chips (and sliced for inference)."""

    tile_size: int | None = Field(
        None, ge=32, le=4096, description="Chip edge in pixels. Exclusive with tile_size_m; "
        "640 when neither is given.")
    tile_size_m: float | None = Field(
        None, gt=0, description="Chip edge in metres, converted with each scene's ground "
        "sample distance, so one config serves 0.3 m and 1 m imagery.")
    overlap: float = Field(
        0.2, ge=0, description="Overlap between neighbouring chips: a fraction of the tile "
        "when < 1, else pixels.")
    min_visibility: float = Field(
        0.5, gt=0, le=1, description="Keep a clipped object when at least this fraction of "
        "its area is inside the chip.")
    max_nodata_fraction: float = Field(
        0.5, ge=0, le=1, description="Skip chips with more nodata than this.")
    background_ratio: float = Field(
        0.2, ge=0, description="Empty chips kept per positive chip (sampled deterministically).")
    image_format: Literal["jpg", "png"] = Field("jpg", description="Chip image encoding.")
    jpeg_quality: int = Field(92, ge=50, le=100, description="JPEG quality of chips.")
    bands: list[int] | None = Field(
        None, min_length=1, max_length=3, description="1-based band indexes mapped to RGB; "
        "default: first three bands (or the single band, repeated).")
    stretch_percentiles: tuple[float, float] = Field(
        (2.0, 98.0), description="Percentile stretch to 8 bit, computed once per scene.")
    workers: int = Field(2, ge=1, le=64, description="Parallel tile workers.")
    seed: int = Field(0, description="Seed for background-chip sampling.")

    @field_validator("stretch_percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError("must be two percentiles with 0 <= low < high <= 100")
        return value

    @model_validator(mode="after")
    def _one_tile_size(self) -> TilingConfig:
        if self.tile_size is not None and self.tile_size_m is not None:
            raise ValueError("give tile_size (pixels) or tile_size_m (metres), not both")
        return self

    @property
    def tile_size_px_default(self) -> int:
        """Tile size in pixels when no metre size is set."""
        return self.tile_size or 640


class CandidateConfig(StrictModel):
    """One hyper-parameter set trained as a challenger in each cycle."""

    name: str = Field(..., description="Short id of the candidate, unique within the type.")
    overrides: TrainArguments = Field(
        default_factory=dict, description="Ultralytics train arguments that differ from the "
        "training defaults, e.g. {lr0: 0.005, mosaic: 0.5}.")

    @field_validator("name")
    @classmethod
    def _slug_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise ValueError("must be 1-63 letters, digits, '.', '_' or '-'")
        return value


class TrainingConfig(StrictModel):
    """How candidates are fine-tuned."""

    initial_model: str = Field(
        "yolo11n.yaml", description="What training starts from when there is no champion yet: "
        "an Ultralytics model YAML (trains from scratch, offline), a registered version "
        "(models:/<name>@<alias> or models:/<name>/<version>), or weights (.pt) by storage URI "
        "(s3://..., file://...) or absolute path. Weights are never downloaded from the "
        "internet.")
    warm_start: bool = Field(
        True, description="Start each cycle from the champion's weights when there is one.")
    epochs: int = Field(30, ge=1, le=1000, description="Epochs per candidate.")
    imgsz: int = Field(640, ge=32, le=4096, description="Training image size in pixels.")
    batch: int = Field(16, ge=1, le=1024, description="Batch size.")
    device: DeviceName = Field("cpu", description="'cpu', a CUDA index such as '0', or '0,1'.")
    workers: int = Field(2, ge=0, le=64, description="Dataloader workers.")
    seed: int = Field(0, description="Training seed.")
    candidates: list[CandidateConfig] = Field(
        default_factory=lambda: [CandidateConfig(name="default")], min_length=1,
        description="Hyper-parameter sets trained as challengers each cycle.")

    @field_validator("initial_model")
    @classmethod
    def _known_model_source(cls, value: str) -> str:
        if value.startswith("models:/"):
            return value
        if value.endswith((".yaml", ".yml")):
            return value
        if not value.endswith(".pt"):
            raise ValueError("must be a model YAML (.yaml), a registered version "
                             "(models:/<name>@<alias>) or a weights file (.pt)")
        if "://" not in value and not value.startswith("/"):
            raise ValueError(
                f"{value!r} is a relative weights file name: it would be looked up in the "
                "working folder of whichever process trains, and Ultralytics downloads missing "
                "weights from the internet. Name the weights by a storage URI (s3://bucket/"
                "path/yolo11n.pt, file:///path/yolo11n.pt), an absolute path or "
                "models:/<name>@<alias>, or train from scratch with a model YAML "
                "(yolo11n.yaml)")
        return value

    @field_validator("candidates")
    @classmethod
    def _unique_candidates(cls, value: list[CandidateConfig]) -> list[CandidateConfig]:
        names = [c.name for c in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(duplicates)}")
        return value


class MiningConfig(StrictModel):
    """Hard-example mining from the champion's mistakes on new scenes."""

    enabled: bool = Field(True, description="Mine hard examples each cycle.")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="IoU for a true positive.")
    conf_threshold: float = Field(
        0.25, ge=0, le=1, description="Detections below this score are ignored.")
    max_per_scene: int = Field(200, ge=0, description="Hard chips per scene at most.")
    max_per_cycle: int = Field(1000, ge=0, description="Hard chips per cycle at most.")
    oversample: int = Field(
        3, ge=1, le=20, description="How many times each hard chip appears in training.")
    dedup_radius_m: float = Field(
        10.0, ge=0, description="Hard chips closer than this to an earlier one are duplicates.")


class IngestConfig(StrictModel):
    """How drops are taken in."""

    empty_drop_quarantine_hours: float | None = Field(
        24.0, gt=0, description="A drop folder still empty after this many hours (by its "
        "modification time) is quarantined with a reason; until then each cycle reports it "
        "as waiting for files (null: wait forever).")


class DatasetConfig(StrictModel):
    """How dataset versions are split and balanced."""

    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of train scenes' chips "
                                "held out for validation (split by scene).")
    test_scene_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of new scenes per region held out into the frozen "
        "test set.")
    rare_class_oversample_cap: float = Field(
        3.0, ge=1, description="Rare classes and regions are oversampled up to this factor.")
    min_train_images: int = Field(
        0, ge=0, description="Pad the training list to at least this many images by repeating "
        "regular training chips in a seeded order (0: no padding). Gives a controlled "
        "comparison the same training budget, e.g. a no-mining arm as many images as the "
        "mining arm.")
    max_train_images: int = Field(
        0, ge=0, description="Training budget: at most this many images (repeats included) "
        "per cycle, so cycle time stays bounded as the catalog grows (0: no cap). Distinct "
        "chips come first, repeats only where room is left: hard chips fill up to "
        "max_hard_fraction of it, a seeded sample of the regular chips weighted by their "
        "balance repeats fills the rest.")
    max_hard_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of max_train_images that hard chips (with their "
        "repeats) may take; the rest stays for regular chips, old regions included.")
    seed: int = Field(0, description="Seed for splits and sampling.")

    @model_validator(mode="after")
    def _budget_fits_padding(self) -> DatasetConfig:
        if self.max_train_images and self.min_train_images > self.max_train_images:
            raise ValueError(f"min_train_images ({self.min_train_images}) exceeds "
                             f"max_train_images ({self.max_train_images})")
        return self


class GuardMetric(StrictModel):
    """A metric that must not drop by more than ``tolerance`` when promoting."""

    metric: MetricName = Field(..., description="Metric name.")
    tolerance: float = Field(0.0, ge=0, le=1, description="Largest drop allowed (absolute).")


class PromotionConfig(StrictModel):
    """When a challenger replaces the champion."""

    registered_model: str | None = Field(
        None, description="MLflow registered model name; default 'autoretrain-<type>'.")
    primary_metric: MetricName = Field("map50_95", description="Metric that must improve.")
    min_improvement: float = Field(
        0.005, ge=0, le=1, description="Smallest absolute gain of the primary metric.")
    guards: list[GuardMetric] = Field(
        default_factory=lambda: [GuardMetric(metric="map50", tolerance=0.02)],
        description="Metrics that may not drop by more than their tolerance.")
    absolute_floor: float = Field(
        0.1, ge=0, le=1, description="Primary metric the first model of a type must reach.")


class DockerRunnerConfig(StrictModel):
    """Settings of the Docker training runner."""

    image: str = Field("autoretrain-trainer:latest", description="Trainer image.")
    docker_url: str = Field(
        "unix://var/run/docker.sock", description="Docker daemon the Docker runner talks to.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs requested (0: CPU only; -1 not allowed).")
    network_mode: str | None = Field(None, description="Container network, e.g. 'host'.")
    shm_size: str = Field("2g", description="Shared memory for dataloader workers.")
    extra_mounts: list[str] = Field(
        default_factory=list, description="Extra bind mounts 'host:container[:ro]'.")
    read_only_root: bool = Field(
        True, description="Read-only root filesystem: the trainer writes only to its scratch "
                          "volume and a tmpfs at /tmp.")

    @field_validator("extra_mounts")
    @classmethod
    def _mount_format(cls, value: list[str]) -> list[str]:
        for mount in value:
            parts = mount.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or (
                    len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"mount {mount!r} must look like 'host:container[:ro|rw]'")
        return value


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"


class KubernetesToleration(StrictModel):
    """One pod toleration (e.g. of the taint on GPU nodes)."""

    key: str | None = Field(None, description="Taint key, e.g. nvidia.com/gpu.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; null: every effect.")


class KubernetesRunnerConfig(StrictModel):
    """Settings of the kubernetes training runner (a KubernetesPodOperator per training).

    Credentials never live here: name the Kubernetes Secrets whose keys become the trainer's
    environment (AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD...) in ``secrets``.
    """

    image: str = Field("autoretrain-trainer:latest", description="Trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the node pulls the image.")
    namespace: str = Field("airflow", pattern=_K8S_NAME, description="Namespace of the pods.")
    kubernetes_conn_id: str = Field(
        "kubernetes_default", description="Airflow connection to the cluster (in the "
        "official Helm chart: in-cluster).")
    service_account_name: str | None = Field(
        None, pattern=_K8S_NAME, description="Service account of the pod (e.g. one bound "
        "to an S3 role, instead of keys).")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu requested (0: CPU only).")
    cpu: str | None = Field(None, pattern=_K8S_QUANTITY,
                            description="CPU request, e.g. '4' or '3500m'.")
    memory: str | None = Field(None, pattern=_K8S_QUANTITY,
                               description="Memory request and limit, e.g. '16Gi'.")
    shm_size: str = Field("2Gi", pattern=_K8S_QUANTITY,
                          description="Shared memory (/dev/shm) for dataloader workers.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod must run on, e.g. "
        "{nvidia.com/gpu.present: 'true'}.")
    tolerations: list[KubernetesToleration] = Field(
        default_factory=list, description="Taints the pod tolerates (GPU nodes are often "
        "tainted).")
    secrets: list[str] = Field(
        default_factory=list, description="Kubernetes Secrets whose keys become the "
        "trainer's environment variables (S3 keys, MLflow credentials).")
    scratch_claim: str | None = Field(
        None, pattern=_K8S_NAME, description="PersistentVolumeClaim mounted at /scratch, so "
        "a retried training resumes from its last checkpoint; null: an emptyDir (a retry "
        "starts over).")
    startup_timeout_s: int = Field(600, ge=30, description="How long the pod may take to "
                                   "start (image pull, scheduling) before the task fails.")

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(_K8S_NAME, name):
                raise ValueError(f"secret name {name!r} is not a Kubernetes name (lower-case "
                                 "letters, digits and '-')")
        return value


class RunnerConfig(StrictModel):
    """Where training runs."""

    kind: Literal["local", "docker", "kubernetes"] = Field(
        "local", description="Training runner: a local process, a Docker container, or a "
        "Kubernetes pod (inside Airflow only).")
    docker: DockerRunnerConfig = Field(default_factory=DockerRunnerConfig,
        description="Docker runner settings (used when kind is docker).")
    kubernetes: KubernetesRunnerConfig = Field(
        default_factory=KubernetesRunnerConfig,
        description="Kubernetes runner settings (used when kind is kubernetes).")
    queue: str | None = Field(
        None, min_length=1, description="Celery queue of the train tasks, e.g. 'train', "
        "served only by the workers that should train (null: the default queue).")
    pool: str | None = Field(
        None, min_length=1, description="Airflow pool of the train tasks: with as many slots "
        "as GPUs, no more trainings run at once (null: the default pool).")


class ObjectTypeConfig(StrictModel):
    """Everything one object type's retraining DAG needs."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Config schema version.")
    name: str = Field(..., description="Object type id: lower-case letters, digits, '_'.")
    description: str = Field("", description="Shown in the DAG documentation.")
    classes: list[str] = Field(..., min_length=1, description="Class names, in model "
                                     "index order. Append new classes at the end.")
    class_aliases: dict[str, str] = Field(
        default_factory=dict, description="Analyst spellings mapped to class names, e.g. "
        "{Car: car, lorry: truck}. Matching is case-insensitive anyway.")
    schedule: str | None = Field(
        "@weekly", description="Cron expression or preset (@daily, @weekly, ...); null for "
        "manual runs only.")
    owner: str = Field("ml-ops", description="DAG owner shown in the Airflow UI.")
    tags: list[str] = Field(default_factory=list, description="Extra DAG tags.")
    trigger: TriggerPolicy = Field(default_factory=TriggerPolicy,
        description="When a scheduled run retrains.")
    ingest: IngestConfig = Field(default_factory=IngestConfig,
        description="How drops are taken in.")
    tiling: TilingConfig = Field(default_factory=TilingConfig,
        description="Chip geometry and radiometry.")
    training: TrainingConfig = Field(default_factory=TrainingConfig,
        description="Fine-tuning settings and candidates.")
    mining: MiningConfig = Field(default_factory=MiningConfig,
        description="Hard-example mining.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig,
        description="Splits and balancing.")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig,
        description="Champion/challenger gate.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig,
        description="Where training runs.")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.fullmatch(value):
            raise ValueError("must start with a lower-case letter and contain only "
                             "lower-case letters, digits and '_' (at most 63)")
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        if any(not v.strip() or len(v) > 64 for v in value):
            raise ValueError("class names must be 1-64 characters and not blank")
        lowered = [v.strip().lower() for v in value]
        duplicates = sorted({v for v in lowered if lowered.count(v) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique (case-insensitive); repeated: "
                             f"{', '.join(duplicates)}")
        if any(v != v.strip() for v in value):
            raise ValueError("class names must not start or end with spaces")
        return value

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None) -> str | None:
        if value is None or value in SCHEDULE_PRESETS:
            return value
        if value.startswith("@"):
            raise ValueError(f"unknown preset; allowed: {', '.join(sorted(SCHEDULE_PRESETS))} "
                             "or a 5-field cron expression")
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError("not a valid 5-field cron expression (minute hour day month "
                             "weekday), e.g. '0 3 * * 1'")
        return value

    @model_validator(mode="after")
    def _aliases_target_classes(self) -> ObjectTypeConfig:
        unknown = sorted({t for t in self.class_aliases.values() if t not in self.classes})
        if unknown:
            raise ValueError(f"class_aliases map to unknown class(es) {', '.join(unknown)}; "
                             f"classes are {', '.join(self.classes)}")
        return self

    @property
    def registered_model_name(self) -> str:
        """MLflow registered model name of this type."""
        return self.promotion.registered_model or f"autoretrain-{self.name}"

    @property
    def class_mapper(self) -> ClassMapper:
        """Maps analysts' and models' class spellings (and ``class_aliases``) to ``classes``."""
        return ClassMapper(tuple(self.classes), dict(self.class_aliases))

    def normalise_class(self, raw: str) -> str | None:
        """Map an analyst's class spelling to a configured class name, or None if unknown."""
        return self.class_mapper.name(raw)


def _field_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe(error: ErrorDetails) -> str:
    where = _field_path(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see the documented fields)"
    if kind == "missing":
        return f"{where}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: got {error.get('input')!r}; {message}"


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One readable message for every problem pydantic found in ``source``."""
    problems = [_describe(e) for e in exc.errors(include_url=False)]
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def parse_object_type_config(data: Any, source: str = "<config>") -> ObjectTypeConfig:
    """Validate an already-parsed mapping; ``source`` names it in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got "
                          f"{type(data).__name__}")
    try:
        return ObjectTypeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_object_type_config(path: str | Path) -> ObjectTypeConfig:
    """Load and validate one object-type YAML file.

    The type's ``name`` must match the file name, so DAG ids and storage prefixes line up.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected at least 'name' and 'classes'")
    config = parse_object_type_config(data, str(path))
    if config.name != path.stem:
        raise ConfigError(f"{path}: name: got {config.name!r}; must equal the file name "
                          f"{path.stem!r}")
    return config


@dataclass(frozen=True)
class ConfigFolder:
    """The object-type configs of one folder: the valid ones, and one message per broken file
    (naming the file and the field)."""

    configs: dict[str, ObjectTypeConfig]
    problems: list[str]


def read_object_type_configs(directory: str | Path) -> ConfigFolder:
    """Load every ``*.yaml`` in ``directory``; a broken file is reported, not raised, so that
    the valid ones stay usable (each object type's DAGs stand on their own).

    Raises:
        ConfigError: the directory is missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: config directory not found")
    configs: dict[str, ObjectTypeConfig] = {}
    problems: list[str] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            config = load_object_type_config(path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        configs[config.name] = config
    return ConfigFolder(configs, problems)


def load_object_type_configs(directory: str | Path) -> dict[str, ObjectTypeConfig]:
    """Load every ``*.yaml`` in ``directory``, keyed by object type name.

    Raises:
        ConfigError: the directory is missing or any file is invalid (all files are checked
            and every problem reported together).
    """
    folder = read_object_type_configs(directory)
    if folder.problems:
        raise ConfigError("\n".join(folder.problems))
    return folder.configs
