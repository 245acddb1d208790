"""How long each stage of a cycle took, whichever process ran it.

Every stage run (one task of the DAG, one step of ``autoretrain cycle``; one record per scene
of ``tile`` and per candidate of ``train``) records its start and end under
``cycles/<type>/<cycle_id>/timing/``. Records are created once and never overwritten: a rerun
of a finished cycle, which reuses its work in seconds, keeps the times of the run that did the
work; a failed attempt records nothing, so its retry does. The report adds them up per stage:
the wall time from the first part's start to the last part's end (mapped parts run side by
side) and the busy time summed over parts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TypeVar

from retrain_lib.core.errors import StorageError
from retrain_lib.core.io import safe_id
from retrain_lib.core.layout import cycle_timing_key, cycle_timing_prefix
from retrain_lib.core.records import Record
from retrain_lib.core.storage import Storage

__all__ = ["STAGES", "StageTime", "describe_stage_times", "duration", "in_stage_order",
           "record_stage_time", "stage_times", "timed_stage"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STAGES = ("check", "ingest", "tile", "mine", "assemble", "train", "evaluate", "register",
          "report")
"""The stages in cycle order, as reports name them."""


class StageTime(Record):
    """One stage's time in a cycle."""

    wall_s: float
    """From the first part's start to the last part's end."""
    busy_s: float
    """Summed over the parts (scenes of ``tile``, candidates of ``train``)."""
    parts: int


def in_stage_order(times: Mapping[str, _T]) -> dict[str, _T]:
    """``times`` keyed by stage, in cycle order (stages this version does not know last)."""
    order = {name: i for i, name in enumerate(STAGES)}
    return dict(sorted(times.items(), key=lambda kv: order.get(kv[0], len(order))))


def duration(seconds: float) -> str:
    """A duration as reports and commands show it."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_stage_times(times: Mapping[str, StageTime]) -> str:
    """``check 1.2 s, ingest 3.4 s, ...``: each stage's wall time, in cycle order."""
    return ", ".join(f"{stage} {duration(t.wall_s)}"
                     for stage, t in in_stage_order(times).items())


@contextmanager
def timed_stage(storage: Storage, object_type: str, cycle_id: str, stage: str,
                part: str = "") -> Iterator[None]:
    """Record how long the body takes, if it ends without an error and nothing was recorded
    for this stage (and part) of the cycle yet."""
    started_at = datetime.now(UTC)
    yield
    record_stage_time(storage, object_type, cycle_id, stage, started_at, part=part)


def record_stage_time(storage: Storage, object_type: str, cycle_id: str, stage: str,
                      started_at: datetime, *, part: str = "") -> None:
    """Record that ``stage`` (and ``part``) of the cycle ran from ``started_at`` until now,
    unless a time is recorded for it already. For a stage whose time is known only once it
    is clear the cycle goes on (the check: a refused or skipped run writes nothing)."""
    ended_at = datetime.now(UTC)
    seconds = (ended_at - started_at).total_seconds()
    record = {"stage": stage, "part": part, "seconds": round(seconds, 3),
              "started_at": started_at.isoformat(timespec="milliseconds"),
              "ended_at": ended_at.isoformat(timespec="milliseconds")}
    name = stage + (f".{safe_id(part, replacement='_')}" if part else "")
    try:
        storage.create(cycle_timing_key(object_type, cycle_id, name),
                       json.dumps(record).encode())
    except StorageError as exc:  # the stage's own work is done: its time is not worth a retry
        log.warning("%s of cycle %s took %.1f s; not recorded (%s)", stage, cycle_id, seconds,
                    exc)


def stage_times(storage: Storage, object_type: str, cycle_id: str) -> dict[str, StageTime]:
    """Each recorded stage's time, in cycle order (unreadable records are left out)."""
    parts: dict[str, list[tuple[datetime, datetime, float]]] = {}
    for key in storage.list(cycle_timing_prefix(object_type, cycle_id)):
        try:
            record = json.loads(storage.get_bytes(key))
            begin = datetime.fromisoformat(record["started_at"])
            end = datetime.fromisoformat(record["ended_at"])
            parts.setdefault(str(record["stage"]), []).append(
                (begin, end, float(record["seconds"])))
        except (ValueError, KeyError, TypeError):
            continue
    return in_stage_order({stage: StageTime(
        wall_s=round((max(e for _, e, _ in runs) - min(b for b, _, _ in runs)).total_seconds(),
                     3),
        busy_s=round(sum(s for _, _, s in runs), 3), parts=len(runs))
        for stage, runs in parts.items()})
