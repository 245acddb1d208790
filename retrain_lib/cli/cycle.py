"""``autoretrain cycle``: one whole retraining cycle in this process, without Airflow."""

from __future__ import annotations

from typing import Annotated

import typer

from retrain_lib.cli.options import (
    DEFAULT_CONFIGS,
    ConfigDirOption,
    MlflowUriOption,
    StorageOption,
)
from retrain_lib.cli.render import console
from retrain_lib.core.console import handle_errors

__all__ = ["cycle_command"]


@handle_errors
def cycle_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    storage: StorageOption = None,
    mlflow_uri: MlflowUriOption = None,
    cycle_id: Annotated[str | None, typer.Option(help="Default: a UTC timestamp.")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even without enough new data.")] = False,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override epochs.")] = None,
) -> None:
    """Run one whole retraining cycle in this process, without Airflow (for replay and debug)."""
    from datetime import UTC, datetime

    from retrain_lib.core.config import load_object_type_config
    from retrain_lib.core.settings import default_storage_uri
    from retrain_lib.cycle.run import run_cycle
    from retrain_lib.cycle.settings import CycleSettings, safe_cycle_id

    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    settings = CycleSettings(storage_uri=storage or default_storage_uri(), mlflow_uri=mlflow_uri)
    cid = safe_cycle_id(cycle_id or datetime.now(UTC).strftime("manual_%Y%m%dT%H%M%S"))
    written, stages = run_cycle(cfg, settings, cid, force=force, epochs=epochs,
                                on_stage=lambda name, _v: console.print(f"[cyan]>[/] {name} done"))
    reason = stages.check.reason if stages.check else ""
    console.print(f"cycle {cid}: [bold]{written.status}[/] ({reason}); report: {written.report}")
    from retrain_lib.cycle.timing import describe_stage_times, stage_times

    times = stage_times(settings.storage(), cfg.name, cid)
    if times:
        console.print("time per stage: " + describe_stage_times(times), highlight=False)

