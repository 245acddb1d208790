"""What each stage of a cycle hands the next: typed results, and the cycle report.

Results are frozen pydantic models (:class:`~retrain_lib.core.records.Record`). They become
JSON only at the XCom boundary and in the report (``to_json``), and are read back with
``from_json``. A result
carries only the fields its stage set (``exclude_unset``), so the report keeps the exact shape
it always had: a skipped mining stage is ``{"skipped": ..., "counts": {}}``, not a row of
zeros.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from retrain_lib.core.records import Record
from retrain_lib.cycle.timing import StageTime, in_stage_order
from retrain_lib.stages.dataset import DatasetVersion
from retrain_lib.stages.evaluate import Metrics
from retrain_lib.stages.ingest import DropOutcome
from retrain_lib.stages.mining import HardExample
from retrain_lib.training.contract import TrainResult

__all__ = [
    "AssembledDataset",
    "ChampionScores",
    "CycleReport",
    "CycleStages",
    "Evaluation",
    "GateRecord",
    "IngestSummary",
    "MiningSummary",
    "ModelScores",
    "PromotionResult",
    "RegionScores",
    "ReportWritten",
    "TiledScene",
    "TrainedCandidate",
    "TriggerDecision",
]

CycleStatus = Literal["skipped", "promoted", "completed", "incomplete"]


class TriggerDecision(Record):
    """1. check: whether this cycle retrains, and why."""

    retrain: bool
    reason: str
    new_annotations: int
    pending_drops: list[str]
    empty_drops: list[str] = Field(default_factory=list,
                                   description="Drop folders with no file yet.")
    untrained_scenes: int
    days_since_training: float | None
    started_at: str | None = Field(None, description="When the cycle started (UTC, ISO).")


class IngestSummary(Record):
    """2. ingest: every drop of this cycle."""

    object_type: str
    cataloged: int
    quarantined: int
    waiting: int = 0
    scene_ids: list[str]
    new_annotations: int
    drops: list[DropOutcome]


class TiledScene(Record):
    """3. tile: one scene's shard."""

    scene_id: str
    shard: str
    reused: bool
    tiles_written: int


class MiningSummary(Record):
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
    examples: list[HardExample] | None = None
    object_type: str | None = None
    reused: bool | None = None


class AssembledDataset(DatasetVersion):
    """5. assemble: the dataset version this cycle trains on."""

    url: str
    scene_ids: list[str]
    hard_shards: int


class TrainedCandidate(TrainResult):
    """6. train: one candidate's training (the entrypoint's result, and where it started)."""

    candidate: str
    parent_version: str | None = None
    weights: str = ""
    reused: bool | None = None


class RegionScores(Record):
    """A model's headline metrics on one region's test scenes."""

    map50_95: float | None
    map50: float | None
    precision: float | None
    recall: float | None


class ModelScores(Metrics):
    """7. evaluate: a model's COCO metrics on the frozen test scenes (rounded, as reports
    record them), overall and per region."""

    regions: dict[str, RegionScores] = Field(default_factory=dict)


class ChampionScores(Record):
    """7. evaluate: the champion, re-scored on this cycle's test scenes."""

    version: str
    metrics: ModelScores


class Evaluation(Record):
    """7. evaluate: every candidate and the champion, on the same frozen test scenes."""

    test_scenes: list[str]
    candidates: dict[str, ModelScores]
    champion: ChampionScores | None = None


class GateRecord(Record):
    """8. promote: the gate's decision on one version."""

    promote: bool
    reason: str


class PromotionResult(Record):
    """8. register and promote: the versions registered and where the alias went."""

    versions: dict[str, str]
    promoted_version: str | None
    previous_champion: str | None = None
    champion_version: str | None
    champion_uri: str | None = None
    decisions: dict[str, GateRecord]
    reused: bool | None = None


class ReportWritten(Record):
    """9. report: where the report is, and what the cycle decided.

    ``reused`` is true when a rerun found the gate already passed by an earlier run of the
    cycle (the DAG's ``publish_champion`` announces the promotion once, whichever run gets
    there: it reads the asset's past events).
    """

    status: CycleStatus
    report: str
    promoted_version: str | None
    reused: bool | None = None


class CycleStages(Record):
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
    stage_times: dict[str, StageTime] | None = None
    """How long each stage took (cycle.timing), in cycle order."""

    @field_validator("stage_times")
    @classmethod
    def _in_cycle_order(cls, times: dict[str, StageTime] | None) -> dict[str, StageTime] | None:
        # report.json is written with sorted keys: the order is restored on reading.
        return None if times is None else in_stage_order(times)
