"""9. report: ``cycles/<type>/<cycle_id>/report.json`` and ``report.md``.

A report is history: what the cycle did and decided, stage by stage
(:class:`~retrain_lib.cycle.results.CycleReport`). Its status is ``skipped`` (the trigger
said no), ``promoted`` (a new champion), ``completed`` (trained and gated, no promotion) or
``incomplete`` (stopped before the gate).
"""

from __future__ import annotations

from datetime import UTC, datetime

from retrain_lib import __version__
from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.layout import report_key, report_markdown_key
from retrain_lib.cycle.results import (
    CycleReport,
    CycleStages,
    CycleStatus,
    ReportWritten,
    TriggerDecision,
)
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.cycle.state import record_training
from retrain_lib.cycle.timing import describe_stage_times, stage_times

__all__ = ["cycle_status", "record_skip", "report_markdown", "write_report"]

_HEADLINE = ("map50_95", "map50", "precision", "recall")


def cycle_status(stages: CycleStages) -> CycleStatus:
    """The report's status for the stages a cycle reached."""
    if stages.check is not None and not stages.check.retrain:
        return "skipped"
    if stages.promotion is None:
        return "incomplete"
    return "promoted" if stages.promotion.promoted_version else "completed"


def report_markdown(report: CycleReport) -> str:
    """The report for people: what came in, what was trained and what the gate decided."""
    lines = [f"# Cycle {report.cycle_id} ({report.object_type})", "",
             f"- started: {report.started_at or ''}", f"- status: {report.status}",
             f"- trigger: {report.check.reason if report.check else ''}"]
    if report.ingest:
        waiting = f", {report.ingest.waiting} empty and waiting" if report.ingest.waiting \
            else ""
        lines.append(f"- ingest: {report.ingest.cataloged} drop(s) cataloged, "
                     f"{report.ingest.quarantined} quarantined{waiting}, "
                     f"{report.ingest.new_annotations} new annotations")
    if report.tiles:
        lines.append(f"- chips: {sum(t.tiles_written for t in report.tiles)} over "
                     f"{len(report.tiles)} scene(s)")
    if report.mine:
        lines.append(f"- hard examples: {report.mine.counts or report.mine.skipped}")
    if report.dataset:
        lines.append(f"- dataset: {report.dataset.version} ({report.dataset.train_images} "
                     f"train / {report.dataset.val_images} val images, "
                     f"{len(report.dataset.test_scenes)} test scenes)")
    if report.evaluation:
        lines += ["", "| model | " + " | ".join(_HEADLINE) + " |", "|---|---|---|---|---|"]
        rows = [(f"candidate {k}", v) for k, v in report.evaluation.candidates.items()]
        if report.evaluation.champion:
            rows.append((f"champion v{report.evaluation.champion.version}",
                         report.evaluation.champion.metrics))
        for name, scores in rows:
            values = scores.headline()
            lines.append(f"| {name} | " + " | ".join(
                "-" if values[k] is None else f"{values[k]:.4f}" for k in _HEADLINE) + " |")
    if report.stage_times:
        lines.append("- time per stage: " + describe_stage_times(report.stage_times))
    if report.promotion:
        promoted = report.promotion.promoted_version
        champion = report.promotion.champion_version
        lines += ["", f"Promotion: {'v' + promoted if promoted else 'none'}; champion is "
                  f"{'v' + champion if champion else 'none'}."]
        for version, decision in report.promotion.decisions.items():
            lines.append(f"- v{version}: {decision.reason}")
    return "\n".join(lines) + "\n"


def write_report(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                 stages: CycleStages) -> ReportWritten:
    """Write the cycle's report (JSON and Markdown); after a training, update the state
    the trigger policy reads."""
    storage = settings.storage()
    started = stages.started_at or (stages.check.started_at if stages.check else None)
    fields = stages.to_json()
    if fields.get("check"):
        fields["check"].pop("started_at", None)  # recorded once, at the top
    if started:
        fields["started_at"] = started
    status = cycle_status(stages)
    times = stage_times(storage, cfg.name, cycle_id)
    report = CycleReport.model_validate({
        "cycle_id": cycle_id, "object_type": cfg.name, "status": status,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": __version__, **fields,
        **({"stage_times": {k: v.to_json() for k, v in times.items()}} if times else {})})
    storage.put_json(report_key(cfg.name, cycle_id), report.to_json())
    storage.put_bytes(report_markdown_key(cfg.name, cycle_id),
                      report_markdown(report).encode())
    if stages.promotion is not None:
        dataset = stages.dataset
        record_training(storage, cfg.name, cycle_id=cycle_id,
                        dataset_version=dataset.version if dataset else "",
                        scene_ids=dataset.scene_ids if dataset else [])
    promotion = stages.promotion
    return ReportWritten(status=status, report=storage.url(report_key(cfg.name, cycle_id)),
                         promoted_version=promotion.promoted_version if promotion else None,
                         reused=promotion.reused if promotion else None)


def record_skip(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                check: TriggerDecision) -> ReportWritten | None:
    """The report of a cycle the trigger policy skipped. A re-run of a cycle that already
    has a report (it trained, or was skipped before) keeps that report: it is history."""
    if settings.storage().exists(report_key(cfg.name, cycle_id)):
        return None
    return write_report(cfg, settings, cycle_id, CycleStages(check=check))
