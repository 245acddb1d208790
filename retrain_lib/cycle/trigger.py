"""1. check: the trigger policy. Is there enough new data, or has it been too long?"""

from __future__ import annotations

import logging
from datetime import datetime

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.cycle.results import TriggerDecision
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.cycle.state import load_state
from retrain_lib.stages.ingest import (
    count_pending_annotations,
    list_catalog_scenes,
    list_empty_drops,
)

log = logging.getLogger(__name__)

__all__ = ["check_new_data"]


def check_new_data(cfg: ObjectTypeConfig, settings: CycleSettings, *, force: bool = False,
                   now: datetime | None = None, started_at: str | None = None
                   ) -> TriggerDecision:
    """Decide whether this cycle retrains.

    New annotations are those in drops waiting in ``incoming/`` plus cataloged scenes no
    training has used yet (for example after a failed cycle). Retrains when there are at
    least ``trigger.min_new_annotations`` of them, or when ``trigger.max_days_without_training``
    have passed since the last training and there is any data at all, or when forced.
    """
    storage = settings.storage()
    state = load_state(storage, cfg.name)
    pending = count_pending_annotations(storage, cfg.name)
    trained = set(state.trained_scenes)
    untrained = [m for m in list_catalog_scenes(storage, cfg.name) if m["scene_id"] not in trained]
    new = sum(pending.values()) + sum(m["objects"] for m in untrained)
    days = state.days_since_training(now)
    policy = cfg.trigger
    has_data = bool(pending) or bool(untrained) or bool(trained)
    if force:
        retrain, reason = True, "forced by the run's params"
    elif new > 0 and new >= policy.min_new_annotations:
        retrain, reason = True, (f"{new} new annotations >= {policy.min_new_annotations}")
    elif (days is not None and policy.max_days_without_training is not None
          and days >= policy.max_days_without_training and has_data):
        retrain, reason = True, (f"{days:.1f} days since the last training >= "
                                 f"{policy.max_days_without_training}")
    else:
        since = f"{days:.1f} days since the last training" if days is not None else \
            "never trained"
        retrain, reason = False, (f"only {new} new annotations (< {policy.min_new_annotations})"
                                  f" and {since}")
    empty = sorted(list_empty_drops(storage, cfg.name))
    if empty:
        reason += (f"; drop(s) {', '.join(empty)} empty, waiting for files")
        for drop_id in empty:
            log.info("drop %s is empty; waiting for files", drop_id)
    start = {} if started_at is None else {"started_at": started_at}  # set only when known
    return TriggerDecision(
        retrain=retrain, reason=reason, new_annotations=new, pending_drops=sorted(pending),
        empty_drops=empty,
        untrained_scenes=len(untrained),
        days_since_training=None if days is None else round(days, 2), **start)
