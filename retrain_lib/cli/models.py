"""``autoretrain models``, ``promote`` and ``rollback``: the registry by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from retrain_lib.cli.options import DEFAULT_CONFIGS, ConfigDirOption, MlflowUriOption
from retrain_lib.cli.render import Table, console, metric
from retrain_lib.core.console import handle_errors

__all__ = ["models_command", "promote_command", "rollback_command"]


def _registry_for(object_type: str, configs: Path, mlflow_uri: str | None) -> Any:
    from retrain_lib.core.config import load_object_type_config
    from retrain_lib.stages.registry import ModelRegistry

    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    return ModelRegistry(cfg.registered_model_name, mlflow_uri)


@handle_errors
def models_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """List registered versions with test metrics, aliases, decisions and lineage."""
    registry = _registry_for(object_type, configs, mlflow_uri)
    versions = registry.list_versions()
    if not versions:
        console.print(f"no versions registered for {registry.model_name} at "
                      f"{registry.tracking_uri}")
        return
    table = Table("version", "aliases", "map50_95", "map50", "parent", "dataset", "cycle",
                  "decision", "reason", title=registry.model_name)
    for v in versions:
        m = v.metrics
        table.add_row(v.version, ",".join(v.aliases), metric(m.get("map50_95")),
                      metric(m.get("map50")), v.parent or "", v.tags.get("dataset_version", ""),
                      v.tags.get("cycle_id", ""), v.tags.get("decision", ""),
                      v.tags.get("decision_reason", ""))
    console.print(table)


@handle_errors
def promote_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    version: Annotated[str, typer.Option("--version", help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")],
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Move the champion alias to a version by hand, with a reason."""
    _move_champion(object_type, configs, mlflow_uri, version, reason, "promoted")


@handle_errors
def rollback_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    to: Annotated[str, typer.Option("--to", help="Version to restore as champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")],
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Point the champion alias back at an earlier version, with a reason."""
    _move_champion(object_type, configs, mlflow_uri, to, reason, "rolled_back")


def _move_champion(object_type: str, configs: Path, mlflow_uri: str | None, version: str,
                   reason: str, action: str) -> None:
    registry = _registry_for(object_type, configs, mlflow_uri)
    previous = registry.set_champion(version, reason, action=action)
    done = "champion is now" if action == "promoted" else "rolled back to"
    console.print(f"{registry.model_name}: {done} v{version} "
                  f"(was {'v' + previous if previous else 'none'})")
