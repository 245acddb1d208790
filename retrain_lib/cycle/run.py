"""A whole cycle in this process, without Airflow: ``autoretrain cycle``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.cycle.data import assemble, ingest, scenes_to_tile, tile_one
from retrain_lib.cycle.lock import hold_cycle, release_cycle
from retrain_lib.cycle.mining import mine
from retrain_lib.cycle.models import evaluate_models, register_and_promote, train_candidate
from retrain_lib.cycle.report import write_report
from retrain_lib.cycle.results import CycleStages, ReportWritten
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.cycle.timing import record_stage_time, timed_stage
from retrain_lib.cycle.trigger import check_new_data

__all__ = ["run_cycle"]


def run_cycle(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str, *,
              force: bool = False, epochs: int | None = None,
              candidates: Sequence[str] | None = None,
              on_stage: Callable[[str, Any], None] | None = None
              ) -> tuple[ReportWritten, CycleStages]:
    """Run every stage in this process, in order; returns where the report is and the stages.

    The object type's cycle lock (:mod:`retrain_lib.cycle.lock`) is held from the decision to
    retrain to the end: another cycle of the type running is a :class:`CycleBusy` error.

    ``on_stage(name, result)`` is called after each stage.
    """
    stages: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds")}

    def done(name: str, value: Any) -> Any:
        stages[name] = value
        if on_stage is not None:
            on_stage(name, value)
        return value

    def report() -> tuple[ReportWritten, CycleStages]:
        reached = CycleStages(**stages)
        return write_report(cfg, settings, cycle_id, reached), reached

    storage = settings.storage()

    def timed(stage: str, part: str = "") -> AbstractContextManager[None]:
        return timed_stage(storage, cfg.name, cycle_id, stage, part)

    started = datetime.now(UTC)
    check = done("check", check_new_data(cfg, settings, force=force))
    if not check.retrain:
        return report()

    def hold() -> None:  # renewed before each stage: a long cycle keeps its lease
        hold_cycle(storage, cfg.name, cycle_id)

    hold()
    # Recorded once the cycle holds its type: a skipped or refused run writes nothing.
    record_stage_time(storage, cfg.name, cycle_id, "check", started)
    try:
        with timed("ingest"):
            done("ingest", ingest(cfg, settings, cycle_id))
        tiles = []
        for scene in scenes_to_tile(cfg, settings):
            hold()
            with timed("tile", scene):
                tiles.append(tile_one(cfg, settings, scene))
        done("tiles", tiles)
        hold()
        with timed("mine"):
            done("mine", mine(cfg, settings, cycle_id))
        hold()
        with timed("assemble"):
            dataset = done("dataset", assemble(cfg, settings, cycle_id))
        names = list(candidates) if candidates else [c.name for c in cfg.training.candidates]
        trained = []
        for name in names:
            hold()
            with timed("train", name):
                trained.append(train_candidate(cfg, settings, cycle_id, dataset, name,
                                               epochs=epochs))
        done("trained", trained)
        hold()
        with timed("evaluate"):
            evaluation = done("evaluation", evaluate_models(cfg, settings, dataset, trained,
                                                            cycle_id=cycle_id))
        hold()
        with timed("register"):
            done("promotion", register_and_promote(cfg, settings, cycle_id, dataset, trained,
                                                   evaluation))
        return report()
    finally:
        # Whatever ended this run (a rerun takes the cycle up again); only a kill leaves the
        # lock, until the same cycle reruns or the lease runs out.
        release_cycle(storage, cfg.name, cycle_id)
