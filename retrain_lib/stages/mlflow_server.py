"""The MLflow boundary: clients that fail fast, and MLflow's errors as the project's own.

MLflow's REST client retries a dead server for minutes, and it raises one exception type for
"this alias does not exist" and "the server did not answer". Every stage that talks to MLflow
goes through :func:`mlflow_client` and :func:`mlflow_errors`, so that

- an unreachable server is a :class:`~retrain_lib.core.errors.RegistryUnavailable` within
  seconds, naming the server and the operation (the Airflow tasks retry it later), and
- a lookup of something that does not exist is told apart (:func:`is_not_found`), so "no
  champion yet" never hides "the registry did not answer".
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from retrain_lib.core.errors import RegistryUnavailable, RetrainError
from retrain_lib.core.settings import default_tracking_uri

__all__ = ["check_reachable", "is_not_found", "mlflow_client", "mlflow_errors"]

# MLflow's codes for a lookup of a model, version or alias that does not exist.
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
_HEALTH_TIMEOUT_S = 10


def is_not_found(exc: BaseException) -> bool:
    """Whether an MLflow exception says "no such model, version or alias"."""
    return getattr(exc, "error_code", None) in _NOT_FOUND_CODES


@contextmanager
def mlflow_errors(operation: str, tracking_uri: str) -> Iterator[None]:
    """Turn MLflow and network errors inside the block into RegistryUnavailable.

    ``operation`` says what was being done, e.g. ``"looking up the champion of
    autoretrain-vehicle"``. Errors that :func:`is_not_found` recognises pass through unchanged
    for the caller to handle; so do the project's own errors.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RetrainError:
        raise
    except MlflowException as exc:
        if is_not_found(exc):
            raise
        raise RegistryUnavailable(f"MLflow at {tracking_uri} failed while {operation}: "
                                  f"{_short(exc)}") from None
    except OSError as exc:  # connection refused, DNS, timeouts (requests' errors are OSError)
        raise RegistryUnavailable(f"MLflow at {tracking_uri} cannot be reached while "
                                  f"{operation}: {exc}") from None


def mlflow_client(tracking_uri: str | None = None) -> tuple[Any, str]:
    """An ``MlflowClient`` for tracking and registry at ``tracking_uri`` (default
    MLFLOW_TRACKING_URI or the embedded SQLite file), and the URI itself.

    An http(s) server is probed once per process first, so a dead one fails in seconds.

    Raises:
        RegistryUnavailable: the server does not answer.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@functools.cache
def check_reachable(uri: str) -> None:
    """Probe an http(s) tracking server once; RegistryUnavailable when it does not answer."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # something answers; MLflow reports real API problems itself
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryUnavailable(f"MLflow tracking server {uri} cannot be reached "
                                  f"({reason})") from None


def _short(exc: Any) -> str:
    message = str(getattr(exc, "message", "") or exc)
    return message if len(message) <= 300 else message[:300] + "..."
