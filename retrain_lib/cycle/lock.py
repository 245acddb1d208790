"""One cycle of an object type at a time, on any storage and from any process.

The lock is a sequence of generations, ``cycles/<type>/lock/<generation>.json``; the highest
names the cycle that holds the type. A cycle takes it when it decides to retrain and gives it
back (marks its generation released) when it ends; every stage renews it. The holder is a cycle
id, not a process: a rerun or a retried task of the same cycle takes it up, while another cycle
of the same type is refused with :class:`CycleBusy` (Airflow retries, so it waits). A holder
that stopped without giving it back (killed, machine lost) loses it when its lease runs out.

Taking the lock, whether it is free, released or expired, is always the creation of the next
generation with a create-if-absent write, never an overwrite: of any number of cycles racing
for it, also to take over the same expired lease, exactly one wins. Only the holder ever writes
its own generation again (renewal, release), and generations only grow, so a cycle that read a
stale state can never take a lock someone else took since.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from retrain_lib.core.errors import CycleBusy, StorageError
from retrain_lib.core.layout import cycle_lock_key, cycle_lock_prefix
from retrain_lib.core.storage import Storage

__all__ = ["DEFAULT_LEASE_H", "LockState", "hold_cycle", "lock_state", "release_cycle"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_H = 24.0
"""How long a cycle that stopped without a word blocks the next one ($AUTORETRAIN_CYCLE_LEASE_H).
Every stage renews it, so it must outlast the longest stage (training)."""
_ATTEMPTS = 8
"""Reads of the lock per call: each lost race re-reads it once (a winner then holds it)."""


@dataclass(frozen=True)
class LockState:
    """The newest generation of an object type's lock."""

    generation: int
    key: str
    cycle_id: str
    since: str
    expires_at: datetime
    released: bool
    record: dict[str, Any]

    def held_at(self, now: datetime) -> bool:
        """Whether a cycle holds the type at ``now``: not given back, lease not run out."""
        return not self.released and self.expires_at > now


def _lease_h() -> float:
    raw = os.environ.get("AUTORETRAIN_CYCLE_LEASE_H", "").strip()
    try:
        return float(raw) if raw else DEFAULT_LEASE_H
    except ValueError:
        return DEFAULT_LEASE_H


def _generation(key: str) -> int | None:
    stem = key.rsplit("/", 1)[-1].removesuffix(".json")
    return int(stem) if stem.isdigit() else None


def lock_state(storage: Storage, object_type: str) -> LockState | None:
    """The newest generation of the type's lock, or None if it was never taken."""
    for _ in range(_ATTEMPTS):
        generations = sorted(g for k in storage.list(cycle_lock_prefix(object_type))
                             if (g := _generation(k)) is not None)
        if not generations:
            return None
        key = cycle_lock_key(object_type, generations[-1])
        try:
            record = storage.get_json(key)
        except StorageError:  # a newer generation removed it after the listing: list again
            continue
        expires = record.get("expires_at", "1970-01-01T00:00:00+00:00")
        return LockState(generation=generations[-1], key=key,
                         cycle_id=str(record.get("cycle_id")), since=str(record.get("since")),
                         expires_at=datetime.fromisoformat(expires),
                         released=bool(record.get("released")), record=record)
    raise StorageError(f"{storage.url(cycle_lock_prefix(object_type))}: the lock changed on "
                       f"every one of {_ATTEMPTS} reads; try again")


def hold_cycle(storage: Storage, object_type: str, cycle_id: str, *,
               now: datetime | None = None) -> None:
    """Take or renew the object type's lock for ``cycle_id``.

    Raises:
        CycleBusy: another cycle of the type holds it and its lease has not run out.
    """
    now = now or datetime.now(UTC)
    record = {"cycle_id": cycle_id, "host": socket.gethostname(), "pid": os.getpid(),
              "since": now.isoformat(timespec="seconds"),
              "expires_at": (now + timedelta(hours=_lease_h())).isoformat(timespec="seconds")}
    for _ in range(_ATTEMPTS):
        current = lock_state(storage, object_type)
        if current is not None and not current.released and current.cycle_id == cycle_id:
            storage.put_json(current.key, {**record, "since": current.since})  # renewal
            return
        if current is not None and current.held_at(now):
            raise _busy(storage, object_type, cycle_id, current)
        generation = 1 if current is None else current.generation + 1
        if storage.create(cycle_lock_key(object_type, generation),
                          json.dumps(record).encode()):
            if current is not None and not current.released:
                log.warning("%s: cycle %s stopped without ending (its lease ran out at %s); "
                            "cycle %s takes over", object_type, current.cycle_id,
                            current.expires_at.isoformat(), cycle_id)
            if current is not None:
                storage.delete(current.key)  # superseded: the new generation is what counts
            return
        # Another cycle created that generation first: read what it holds.
    current = lock_state(storage, object_type)
    assert current is not None  # every lost race leaves a newer generation behind
    raise _busy(storage, object_type, cycle_id, current)


def _busy(storage: Storage, object_type: str, cycle_id: str, current: LockState) -> CycleBusy:
    return CycleBusy(
        f"{object_type}: cycle {current.cycle_id} is running (since {current.since}, on "
        f"{current.record.get('host')}); cycle {cycle_id} waits for it to end (its lease runs "
        f"out at {current.expires_at.isoformat()}). If it was stopped for good, delete "
        f"{storage.url(current.key)}")


def release_cycle(storage: Storage, object_type: str, cycle_id: str) -> None:
    """Give the lock back, if ``cycle_id`` holds it."""
    current = lock_state(storage, object_type)
    if current is not None and current.cycle_id == cycle_id and not current.released:
        storage.put_json(current.key, {**current.record, "released": True,
                                       "released_at": datetime.now(UTC).isoformat(
                                           timespec="seconds")})
