"""What the last trainings of an object type used: ``cycles/<type>/state.json``."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from retrain_lib.core.layout import cycle_state_key
from retrain_lib.core.storage import Storage

__all__ = ["CycleState", "load_state", "record_training"]


class CycleState(BaseModel):
    """The trigger policy's memory: which scenes were trained on, and when."""

    model_config = ConfigDict(extra="forbid")

    trained_scenes: list[str] = []
    last_trained_at: str | None = None
    last_cycle_id: str | None = None
    last_dataset_version: str | None = None

    def days_since_training(self, now: datetime | None = None) -> float | None:
        """Days since the last training finished, or None before the first one."""
        if not self.last_trained_at:
            return None
        elapsed = (now or datetime.now(UTC)) - datetime.fromisoformat(self.last_trained_at)
        return elapsed.total_seconds() / 86400


def load_state(storage: Storage, object_type: str) -> CycleState:
    """The state of an object type (empty before its first training)."""
    key = cycle_state_key(object_type)
    return CycleState.model_validate(storage.get_json(key)) if storage.exists(key) \
        else CycleState()


def record_training(storage: Storage, object_type: str, *, cycle_id: str,
                    dataset_version: str, scene_ids: Iterable[str]) -> CycleState:
    """Remember that ``cycle_id`` trained on ``scene_ids``; returns the new state."""
    state = load_state(storage, object_type)
    updated = CycleState(
        trained_scenes=sorted(set(state.trained_scenes) | set(scene_ids)),
        last_trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        last_cycle_id=cycle_id, last_dataset_version=dataset_version)
    storage.put_json(cycle_state_key(object_type), updated.model_dump(mode="json"))
    return updated
