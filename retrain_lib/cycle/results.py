"""What each stage of a cycle hands the next: typed results, and the cycle report.

Results are frozen pydantic models. They become JSON only at the XCom boundary and in the
report (:meth:`StageResult.to_json`), and are read back with ``Model.from_json``. A result
carries only the fields its stage set (``exclude_unset``), so the report keeps the exact shape
it always had: a skipped mining stage is ``{"skipped": ..., "counts": {}}``, not a row of
zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AssembledDataset",
    "ChampionScores",
    "CycleReport",
    "CycleStages",
    "DropRecord",
    "Evaluation",
    "GateRecord",
    "HardExampleRecord",
    "IngestSummary",
    "MiningSummary",
    "ModelScores",
    "ProblemRecord",
    "PromotionResult",
    "RegionScores",
    "ReportWritten",
    "StageResult",
    "TiledScene",
    "TrainedCandidate",
    "TriggerDecision",
]

CycleStatus = Literal["skipped", "promoted", "completed", "incomplete"]


class StageResult(BaseModel):
    """Base of every stage result: strict, immutable, JSON at the boundary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (what XCom carries and the report records)."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | Self) -> Self:
        """Read a result back from its JSON form (a result passes through unchanged)."""
        return data if isinstance(data, cls) else cls.model_validate(dict(data))


class TriggerDecision(StageResult):
    """1. check: whether this cycle retrains, and why."""

    retrain: bool
    reason: str
    new_annotations: int
    pending_drops: list[str]
    untrained_scenes: int
    days_since_training: float | None
    started_at: str | None = Field(None, description="When the cycle started (UTC, ISO).")


class ProblemRecord(StageResult):
    """One reason a drop was rejected."""

    file: str
    problem: str


class DropRecord(StageResult):
    """2. ingest: what happened to one drop."""

    drop_id: str
    status: Literal["cataloged", "quarantined"]
    scene_ids: list[str]
    annotations: int
    problems: list[ProblemRecord]
    notes: list[str]
    location: str


class IngestSummary(StageResult):
    """2. ingest: every drop of this cycle."""

    object_type: str
    cataloged: int
    quarantined: int
    scene_ids: list[str]
    new_annotations: int
    drops: list[DropRecord]


class TiledScene(StageResult):
    """3. tile: one scene's shard."""

    scene_id: str
    shard: str
    reused: bool
    tiles_written: int


class HardExampleRecord(StageResult):
    """4. mine: one mistake of the champion and the chip that teaches it."""

    scene_id: str
    reason: Literal["false_positive", "false_negative"]
    class_name: str
    score: float | None
    model_version: str
    box_px: tuple[float, float, float, float]
    center_map: tuple[float, float]
    center_lonlat: tuple[float, float]
    window: tuple[int, int, int, int]
    crs: str


class MiningSummary(StageResult):
    """4. mine: the cycle's hard examples (also the mining manifest), or why none."""

    skipped: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    cycle_id: str | None = None
    model_version: str | None = None
    scenes: list[str] | None = None
    scenes_with_chips: list[str] | None = None
    duplicates: int | None = None
    capped: int | None = None
    candidates: dict[str, int] | None = None
    examples: list[HardExampleRecord] | None = None
    object_type: str | None = None
    reused: bool | None = None


class AssembledDataset(StageResult):
    """5. assemble: the dataset version this cycle trains on."""

    object_type: str
    version: str
    prefix: str
    data_yaml_key: str
    train_images: int
    val_images: int
    test_scenes: list[str]
    reused: bool
    url: str
    scene_ids: list[str]
    hard_shards: int


class TrainedCandidate(StageResult):
    """6. train: one candidate's training (the entrypoint's result, and where it started)."""

    mlflow_run_id: str
    weights_uri: str
    metrics: dict[str, float]
    epochs_run: int
    wall_time_s: float
    resumed: bool
    out_uri: str = ""
    model_source: str = ""
    classes: list[str] = Field(default_factory=list)
    candidate: str
    parent_version: str | None = None
    weights: str = ""
    reused: bool | None = None


class RegionScores(StageResult):
    """A model's headline metrics on one region's test scenes."""

    map50_95: float | None
    map50: float | None
    precision: float | None
    recall: float | None


class ModelScores(StageResult):
    """7. evaluate: a model's COCO metrics on the frozen test scenes, overall and per region."""

    map50_95: float | None
    map50: float | None
    map75: float | None
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    precision: float | None
    recall: float | None
    per_class: dict[str, dict[str, float | int | None]]
    counts: dict[str, int]
    iou_threshold: float
    conf_threshold: float
    area_ranges: dict[str, float] | None
    classes: list[str]
    notes: list[str]
    regions: dict[str, RegionScores] = Field(default_factory=dict)

    def scalars(self) -> dict[str, float | None]:
        """The metrics promotion may compare on, by name."""
        return {name: getattr(self, name) for name in (
            "map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
            "precision", "recall")}


class ChampionScores(StageResult):
    """7. evaluate: the champion, re-scored on this cycle's test scenes."""

    version: str
    metrics: ModelScores


class Evaluation(StageResult):
    """7. evaluate: every candidate and the champion, on the same frozen test scenes."""

    test_scenes: list[str]
    candidates: dict[str, ModelScores]
    champion: ChampionScores | None = None


class GateRecord(StageResult):
    """8. promote: the gate's decision on one version."""

    promote: bool
    reason: str


class PromotionResult(StageResult):
    """8. register and promote: the versions registered and where the alias went."""

    versions: dict[str, str]
    promoted_version: str | None
    previous_champion: str | None = None
    champion_version: str | None
    champion_uri: str | None = None
    decisions: dict[str, GateRecord]
    reused: bool | None = None


class ReportWritten(StageResult):
    """9. report: where the report is, and what the cycle decided."""

    status: CycleStatus
    report: str
    promoted_version: str | None


class CycleStages(StageResult):
    """The results of every stage a cycle reached, in order."""

    started_at: str | None = None
    check: TriggerDecision | None = None
    ingest: IngestSummary | None = None
    tiles: list[TiledScene] | None = None
    mine: MiningSummary | None = None
    dataset: AssembledDataset | None = None
    trained: list[TrainedCandidate] | None = None
    evaluation: Evaluation | None = None
    promotion: PromotionResult | None = None


class CycleReport(CycleStages):
    """``cycles/<type>/<cycle_id>/report.json``: what a cycle did and decided."""

    cycle_id: str
    object_type: str
    status: CycleStatus
    written_at: str
    code_version: str
