"""What every task of the DAGs shares: the cycle id, error mapping and the stage call.

:func:`run_stage` is a task's whole body: it runs one stage of :mod:`retrain_lib.cycle` with
the running task's settings, maps the project's errors to the right Airflow exception, and
returns the stage's typed result as JSON for XCom.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import CycleBusy, RetrainError, StorageError, TrainingFailed

__all__ = [
    "current_cycle_id",
    "hold_current_cycle",
    "record_check_time",
    "release_current_cycle",
    "retrain_errors",
    "run_cycle_stage",
    "run_stage",
    "stage_timing",
]

log = logging.getLogger(__name__)

_TRANSIENT = (StorageError, TrainingFailed, CycleBusy)


def current_cycle_id(context: Mapping[str, Any] | None = None) -> str:
    """The cycle id of the running DAG run (see :func:`retrain_lib.cycle.settings.run_cycle_id`).

    Its logical date when it has one, else its run id: retries, cleared tasks and re-runs of
    the same logical date all find the cycle's earlier work.
    """
    from retrain_lib.cycle.settings import run_cycle_id

    context = context if context is not None else get_current_context()
    return run_cycle_id(str(context["run_id"]), context.get("logical_date"))


@contextmanager
def retrain_errors() -> Iterator[None]:
    """Turn a RetrainError into one log line and the right Airflow exception.

    Storage and training failures, and another cycle of the type running, may pass on a retry,
    so they raise AirflowException (the task retries with backoff). Bad input, bad settings and
    every other RetrainError fail the task at once (AirflowFailException): a retry cannot fix
    them. Other exceptions are bugs and keep their traceback.
    """
    try:
        yield
    except RetrainError as exc:
        message = str(exc)
        log.error("%s: %s", type(exc).__name__, message)
        if isinstance(exc, _TRANSIENT):
            raise AirflowException(message) from None
        raise AirflowFailException(message) from None


def run_stage(stage: Callable[..., Any], cfg: ObjectTypeConfig, *args: Any,
              **kwargs: Any) -> Any:
    """``stage(cfg, cycle_settings(), *args, **kwargs)`` inside :func:`retrain_errors`; a
    typed result (or a list of them) comes back as JSON for XCom."""
    from retrain_lib.airflow.hooks import cycle_settings
    from retrain_lib.core.records import Record

    with retrain_errors():
        result = stage(cfg, cycle_settings(), *args, **kwargs)
    if isinstance(result, Record):
        return result.to_json()
    if isinstance(result, list):
        return [r.to_json() if isinstance(r, Record) else r for r in result]
    return result


def hold_current_cycle(cfg: ObjectTypeConfig) -> None:
    """Take or renew the object type's cycle lock for the running DAG run's cycle
    (:mod:`retrain_lib.cycle.lock`); another cycle of the type running fails the task with a
    retry: it waits."""
    from retrain_lib.airflow.hooks import cycle_settings
    from retrain_lib.cycle.lock import hold_cycle

    with retrain_errors():
        hold_cycle(cycle_settings().storage(), cfg.name, current_cycle_id())


def release_current_cycle(cfg: ObjectTypeConfig) -> None:
    """Give the object type's cycle lock back, if the running DAG run's cycle holds it."""
    from retrain_lib.airflow.hooks import cycle_settings
    from retrain_lib.cycle.lock import release_cycle

    with retrain_errors():
        release_cycle(cycle_settings().storage(), cfg.name, current_cycle_id())


def record_check_time(cfg: ObjectTypeConfig, started_at: datetime) -> None:
    """Record the check stage's time, once the running DAG run's cycle holds its type."""
    from retrain_lib.airflow.hooks import cycle_settings
    from retrain_lib.cycle.timing import record_stage_time

    record_stage_time(cycle_settings().storage(), cfg.name, current_cycle_id(), "check",
                      started_at)


@contextmanager
def stage_timing(cfg: ObjectTypeConfig, stage: str, part: str = "") -> Iterator[None]:
    """Record how long the body takes as ``stage`` (and ``part``) of the running DAG run's
    cycle (:mod:`retrain_lib.cycle.timing`); the report adds the records up."""
    from retrain_lib.airflow.hooks import cycle_settings
    from retrain_lib.cycle.timing import timed_stage

    with timed_stage(cycle_settings().storage(), cfg.name, current_cycle_id(), stage, part):
        yield


def run_cycle_stage(stage: Callable[..., Any], cfg: ObjectTypeConfig, *args: Any,
                    timed: str | None = None, part: str = "", **kwargs: Any) -> Any:
    """:func:`run_stage` for a stage of a retraining cycle: the cycle's lock is renewed
    first, so two cycles of one type never interleave. With ``timed``, the stage's time is
    recorded under that name (``part``: the scene or candidate of a mapped task)."""
    hold_current_cycle(cfg)
    if timed is None:
        return run_stage(stage, cfg, *args, **kwargs)
    with stage_timing(cfg, timed, part):
        return run_stage(stage, cfg, *args, **kwargs)
