"""The one mapping from analysts' and models' class spellings to an object type's classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from retrain_lib.core.errors import InputError

if TYPE_CHECKING:  # numpy is imported when used: config models load this module at DAG parse
    import numpy as np

__all__ = ["ClassMapper"]


@dataclass(frozen=True)
class ClassMapper:
    """Maps class names to the configured classes and their model indexes.

    Matching ignores case and surrounding spaces; ``aliases`` (e.g. ``{"lorry": "truck"}``)
    add analysts' spellings.

    Attributes:
        classes: Class names in model index order.
        aliases: Extra spellings mapped to a name in ``classes``.
    """

    classes: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    _lookup: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup = {alias.strip().lower(): target for alias, target in self.aliases.items()}
        lookup.update({name.strip().lower(): name for name in self.classes})
        object.__setattr__(self, "_lookup", lookup)

    def name(self, raw: str) -> str | None:
        """The configured class name for ``raw``, or None when it is unknown."""
        return self._lookup.get(raw.strip().lower())

    def index(self, raw: str) -> int | None:
        """The model index for ``raw``, or None when it is unknown."""
        name = self.name(raw)
        return None if name is None else self.classes.index(name)

    def indexes(self, names: Sequence[str], *, source: str, what: str = "the object type",
                feature_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Model indexes of ``names`` (one per feature of ``source``).

        Raises:
            InputError: a name is unknown; names the file, the feature and what is allowed.
        """
        import numpy as np

        out = np.empty(len(names), dtype=np.int64)
        for i, raw in enumerate(names):
            k = self.index(raw)
            if k is None:
                feature = i if feature_index is None else int(feature_index[i])
                raise InputError(f"{source}: feature {feature} has class {raw!r}, which "
                                 f"{what} does not know; expected one of "
                                 f"{', '.join(self.classes)}")
            out[i] = k
        return out

    def indexes_or_unknown(self, names: Sequence[str]) -> np.ndarray:
        """Model indexes of ``names``, -1 for names this mapper does not know."""
        import numpy as np

        return np.array([-1 if (k := self.index(n)) is None else k for n in names],
                        dtype=np.int64)
