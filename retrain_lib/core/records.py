"""The base of every typed result a stage hands on: strict, immutable, JSON at the boundary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict

__all__ = ["Record"]


class Record(BaseModel):
    """A frozen pydantic model that becomes JSON only where it leaves the process (XCom, a
    report, a manifest, the training's result line) and is read back with :meth:`from_json`.

    :meth:`to_json` carries only the fields that were set (``exclude_unset``), so an optional
    part of a result that a stage did not reach stays out of the JSON instead of appearing as
    ``null``; a result read back from JSON dumps to the same JSON.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | Self) -> Self:
        """Read a record back from its JSON form (a record passes through unchanged)."""
        return data if isinstance(data, cls) else cls.model_validate(dict(data))
