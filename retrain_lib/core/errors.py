"""One exception hierarchy for AutoRetrain.

Every error a user can act on derives from :class:`RetrainError`. The CLI and the Airflow tasks
turn these into one readable line; any other exception is a bug and keeps its traceback.
Subclasses also inherit the builtin they resemble, so callers that catch ``ValueError`` or
``OSError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CycleBusy",
    "InputError",
    "RegistryUnavailable",
    "RetrainError",
    "StorageError",
    "TrainingFailed",
]


class RetrainError(Exception):
    """Root of every error AutoRetrain raises on purpose.

    Its message must say what was wrong, where (file, field, feature) and what was expected.
    """

    exit_code: int = 1


class ConfigError(RetrainError, ValueError):
    """An object-type config or a command-line setting is invalid."""

    exit_code = 2


class InputError(RetrainError, ValueError):
    """Input data (a drop, a raster, an annotation file) is unusable."""

    exit_code = 2


class StorageError(RetrainError, OSError):
    """Storage could not be reached, or an object is missing or unreadable."""


class RegistryUnavailable(StorageError):
    """The MLflow tracking server or registry did not answer; the message names the server
    and the operation. Unlike "no champion yet", retrying later may help."""


class CycleBusy(RetrainError):
    """Another cycle of the object type is running; retrying later may help."""


class TrainingFailed(RetrainError):
    """A training run failed; ``logs`` carries the tail of its output."""

    def __init__(self, message: str, logs: str = "") -> None:
        super().__init__(message)
        self.logs = logs

    def __str__(self) -> str:
        base = super().__str__()
        if not self.logs:
            return base
        tail = "\n".join(self.logs.rstrip().splitlines()[-20:])
        return f"{base}\n--- last lines of the training log ---\n{tail}"
