"""An object type's history: one row per cycle, read from the cycles' reports, and the
champion's timeline, read from the registry.

What ``autoretrain history`` prints, and what a history view serves. A report that is
missing, unreadable or of an unknown shape becomes a row that names the problem; it never
stops the rest of the history from loading. Reports are read in parallel (on S3 each is one
GET); the registry is listed once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field, ValidationError

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import StorageError
from retrain_lib.core.layout import join_key, report_key
from retrain_lib.core.records import Record
from retrain_lib.core.storage import Storage
from retrain_lib.cycle.champion import registry
from retrain_lib.cycle.results import CycleReport
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.stages.registry import CHAMPION_ALIAS, AliasChange, ModelVersionInfo

__all__ = ["ChampionEvent", "CycleRow", "History", "decided_by", "load_history"]

READERS = 16
"""Reports read at once (S3 answers each GET in a few ms; the latency overlaps)."""
NOT_CYCLES = frozenset({"lock"})


class QuarantinedDrop(Record):
    """A drop a cycle quarantined, with its reasons."""

    drop_id: str
    problems: list[str]


class ModelRow(Record):
    """A model's headline numbers in one cycle, on the cycle's frozen test scenes."""

    name: str
    """``candidate a`` or ``champion v3``."""
    version: str | None = None
    map50_95: float | None = None
    map50: float | None = None
    regions: dict[str, float | None] = Field(default_factory=dict)
    """mAP50 per region."""


class CycleRow(Record):
    """What one cycle did and decided."""

    cycle_id: str
    problem: str = ""
    """Why the row is incomplete (a missing or corrupt report); empty when it is whole."""
    status: str = ""
    started_at: str | None = None
    trigger: str = ""
    new_scenes: int = 0
    new_annotations: int = 0
    quarantined: list[QuarantinedDrop] = Field(default_factory=list)
    chips: int = 0
    hard_by_reason: dict[str, int] = Field(default_factory=dict)
    dataset_version: str = ""
    models: list[ModelRow] = Field(default_factory=list)
    promoted_version: str | None = None
    decisions: dict[str, str] = Field(default_factory=dict)
    """version -> the gate's reason."""
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    mlflow_runs: dict[str, str] = Field(default_factory=dict)
    """candidate -> MLflow run id."""
    versions: dict[str, str] = Field(default_factory=dict)
    """candidate -> registered version."""
    report: str = ""


class ChampionEvent(Record):
    """A move of the champion alias: which version, when, how and why."""

    version: str
    action: str
    """promoted or rolled_back."""
    at: str
    reason: str
    by: str
    replaced_version: str = ""
    current: bool = False


class History(Record):
    """An object type's cycles, newest first, and its champion's timeline, oldest first."""

    object_type: str
    model_name: str
    champion: str | None
    cycles: list[CycleRow]
    champion_timeline: list[ChampionEvent]


def _row(cycle_id: str, doc: Any, url: str) -> CycleRow:
    try:
        report = CycleReport.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        return CycleRow(cycle_id=cycle_id, report=url,
                        problem=f"report.json is not a cycle report ({where}: {first['msg']}; "
                                f"{exc.error_count()} problem(s))")
    row: dict[str, Any] = {
        "cycle_id": cycle_id, "report": url, "status": report.status,
        "started_at": report.started_at,
        "trigger": report.check.reason if report.check else ""}
    if report.ingest:
        row.update(new_scenes=len(report.ingest.scene_ids),
                   new_annotations=report.ingest.new_annotations,
                   quarantined=[QuarantinedDrop(
                       drop_id=d.drop_id, problems=[f"{p.file}: {p.problem}" for p in d.problems])
                       for d in report.ingest.drops if d.status == "quarantined"])
    if report.tiles:
        row["chips"] = sum(t.tiles_written for t in report.tiles)
    if report.mine:
        row["hard_by_reason"] = dict(report.mine.counts)
    if report.dataset:
        row["dataset_version"] = report.dataset.version
    if report.trained:
        row["mlflow_runs"] = {t.candidate: t.mlflow_run_id for t in report.trained}
    if report.evaluation:
        models = [ModelRow(name=f"candidate {name}", map50_95=s.map50_95, map50=s.map50,
                           regions={r: v.map50 for r, v in s.regions.items()},
                           version=report.promotion.versions.get(name)
                           if report.promotion else None)
                  for name, s in report.evaluation.candidates.items()]
        champion = report.evaluation.champion
        if champion is not None:
            models.append(ModelRow(
                name=f"champion v{champion.version}", version=champion.version,
                map50_95=champion.metrics.map50_95, map50=champion.metrics.map50,
                regions={r: v.map50 for r, v in champion.metrics.regions.items()}))
        row["models"] = models
    if report.promotion:
        row.update(promoted_version=report.promotion.promoted_version,
                   versions=dict(report.promotion.versions),
                   decisions={v: d.reason for v, d in report.promotion.decisions.items()})
    if report.stage_times:
        row["stage_seconds"] = {k: v.wall_s for k, v in report.stage_times.items()}
    return CycleRow.model_validate(row)


def _read(storage: Storage, object_type: str, cycle_id: str, has_report: bool) -> CycleRow:
    key = report_key(object_type, cycle_id)
    url = storage.url(key)
    if not has_report:
        return CycleRow(cycle_id=cycle_id, report=url,
                        problem="no report.json (the cycle is running, or stopped before its "
                                "report)")
    try:
        doc = storage.get_json(key)
    except (StorageError, ValueError) as exc:
        return CycleRow(cycle_id=cycle_id, report=url,
                        problem=f"report.json cannot be read: {exc}")
    return _row(cycle_id, doc, url)


def decided_by(tags: dict[str, str] | Any) -> str:
    """Who moved the alias: a person (manual moves), or the gate of the version's cycle."""
    if tags.get("decided_by"):
        return str(tags["decided_by"])
    if str(tags.get("decision_reason", "")).startswith("manual:") or \
            tags.get("decision") == "rolled_back":
        return "by hand"
    cycle = tags.get("cycle_id", "")
    return f"the gate of cycle {cycle}" if cycle and tags.get("decision") else ""


def _timeline(versions: list[ModelVersionInfo], changes: list[AliasChange],
              champion: str | None) -> list[ChampionEvent]:
    """Every alias move from the registry's log; for moves made before the log was kept,
    each version's latest move from its tags."""
    tags = {v.version: v.tags for v in versions}
    logged = [ChampionEvent(
        version=c.version, action=c.action, at=c.at, reason=c.reason,
        by=decided_by({**tags.get(c.version, {}), "decision": c.action,
                       "decision_reason": c.reason}),
        replaced_version=c.replaced_version) for c in changes]
    if logged:
        if logged[-1].version == champion:
            logged[-1] = logged[-1].model_copy(update={"current": True})
        return logged
    events = []
    for info in versions:
        action = info.tags.get("decision", "")
        if action not in ("promoted", "rolled_back"):
            continue
        events.append(ChampionEvent(
            version=info.version, action=action, at=info.tags.get(f"{action}_at", ""),
            reason=info.tags.get("decision_reason", ""),
            by=decided_by(info.tags),
            replaced_version=info.tags.get("replaced_version", ""),
            current=info.version == champion))
    return sorted(events, key=lambda e: (e.at, int(e.version)))


def load_history(cfg: ObjectTypeConfig, settings: CycleSettings, *,
                 last: int | None = None) -> History:
    """The history of ``cfg``'s type: cycles newest first (the ``last`` N), the timeline.

    Raises:
        StorageError: the storage root cannot be listed.
        RegistryUnavailable: MLflow did not answer.
    """
    storage = settings.storage()
    prefix = join_key("cycles", cfg.name)
    # One listing names the cycles and which have a report: one GET per report, no HEADs.
    cycles: dict[str, bool] = {}
    for key in storage.list(prefix):
        parts = key[len(prefix) + 1:].split("/")
        if len(parts) > 1 and parts[0] not in NOT_CYCLES:
            cycles[parts[0]] = cycles.get(parts[0], False) or parts[1:] == ["report.json"]
    cycle_ids = sorted(cycles, reverse=True)[:last]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        rows = list(pool.map(lambda c: _read(storage, cfg.name, c, cycles[c]), cycle_ids))
    rows.sort(key=lambda r: (r.started_at or "", r.cycle_id), reverse=True)
    models = registry(cfg, settings)
    versions = models.list_versions()
    champion = next((v.version for v in versions if CHAMPION_ALIAS in v.aliases), None)
    return History(object_type=cfg.name, model_name=models.model_name, champion=champion,
                   cycles=rows,
                   champion_timeline=_timeline(versions, models.alias_changes(), champion))
