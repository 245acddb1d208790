"""One cycle of an object type at a time, on any storage and from any process.

``cycles/<type>/lock.json`` names the cycle that holds the type. A cycle takes it when it
decides to retrain and gives it back when it ends; every stage renews it. The holder is a
cycle id, not a process: a rerun or a retried task of the same cycle takes it up, while
another cycle of the same type is refused with :class:`CycleBusy` (Airflow retries, so it
waits). A holder that stopped without giving it back (killed, machine lost) loses it when its
lease runs out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime, timedelta

from retrain_lib.core.errors import CycleBusy, StorageError
from retrain_lib.core.layout import cycle_lock_key
from retrain_lib.core.storage import Storage

__all__ = ["DEFAULT_LEASE_H", "hold_cycle", "release_cycle"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_H = 24.0
"""How long a cycle that stopped without a word blocks the next one ($AUTORETRAIN_CYCLE_LEASE_H).
Every stage renews it, so it must outlast the longest stage (training)."""


def _lease_h() -> float:
    raw = os.environ.get("AUTORETRAIN_CYCLE_LEASE_H", "").strip()
    try:
        return float(raw) if raw else DEFAULT_LEASE_H
    except ValueError:
        return DEFAULT_LEASE_H


def hold_cycle(storage: Storage, object_type: str, cycle_id: str, *,
               now: datetime | None = None) -> None:
    """Take or renew the object type's lock for ``cycle_id``.

    Raises:
        CycleBusy: another cycle of the type holds it and its lease has not run out.
    """
    key = cycle_lock_key(object_type)
    now = now or datetime.now(UTC)
    record = {"cycle_id": cycle_id, "host": socket.gethostname(), "pid": os.getpid(),
              "since": now.isoformat(timespec="seconds"),
              "expires_at": (now + timedelta(hours=_lease_h())).isoformat(timespec="seconds")}
    if storage.create(key, json.dumps(record).encode()):
        return
    try:
        current = storage.get_json(key)
    except StorageError:  # given back between the two calls
        if storage.create(key, json.dumps(record).encode()):
            return
        current = storage.get_json(key)
    expired = datetime.fromisoformat(current.get("expires_at", "1970-01-01T00:00:00+00:00"))
    if current.get("cycle_id") != cycle_id and expired > now:
        raise CycleBusy(
            f"{object_type}: cycle {current.get('cycle_id')} is running (since "
            f"{current.get('since')}, on {current.get('host')}); cycle {cycle_id} waits for "
            f"it to end (its lease runs out at {current.get('expires_at')}). If it was "
            f"stopped for good, delete {storage.url(key)}")
    if current.get("cycle_id") != cycle_id:
        log.warning("%s: cycle %s stopped without ending (its lease ran out at %s); cycle "
                    "%s takes over", object_type, current.get("cycle_id"),
                    current.get("expires_at"), cycle_id)
    else:
        record["since"] = current.get("since", record["since"])
    storage.put_json(key, record)


def release_cycle(storage: Storage, object_type: str, cycle_id: str) -> None:
    """Give the lock back, if ``cycle_id`` holds it."""
    key = cycle_lock_key(object_type)
    try:
        current = storage.get_json(key)
    except StorageError:
        return
    if current.get("cycle_id") == cycle_id:
        storage.delete(key)
