"""``autoretrain history``: an object type's cycles and its champion's timeline."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from retrain_lib.cli.options import (
    DEFAULT_CONFIGS,
    ConfigDirOption,
    MlflowUriOption,
    StorageOption,
)
from retrain_lib.cli.render import Table, console, metric
from retrain_lib.core.console import handle_errors

__all__ = ["history_command"]


@handle_errors
def history_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    last: Annotated[int | None, typer.Option(min=1, help="Only the last N cycles.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the history as JSON.")] = False,
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    storage: StorageOption = None,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Every cycle of a type, newest first: data in, chips, hard examples, dataset, the
    candidates against the champion, the decision and the time per stage; and the champion's
    timeline."""
    from retrain_lib.core.config import load_object_type_config
    from retrain_lib.core.settings import default_storage_uri
    from retrain_lib.cycle.history import load_history
    from retrain_lib.cycle.settings import CycleSettings
    from retrain_lib.cycle.timing import duration

    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    settings = CycleSettings(storage_uri=storage or default_storage_uri(), mlflow_uri=mlflow_uri)
    history = load_history(cfg, settings, last=last)
    if as_json:
        typer.echo(json.dumps(history.model_dump(mode="json"), indent=1))
        return
    table = Table(title=f"{history.model_name}: cycles")
    # Ids and dates stay whole; long reasons wrap within their column.
    for name in ("cycle", "started", "status"):
        table.add_column(name, no_wrap=True)
    for name in ("new scenes / annotations", "quarantined", "chips", "hard", "dataset",
                 "mAP50-95 (best candidate / champion)", "decision", "time"):
        table.add_column(name, max_width=48 if name in ("quarantined", "decision") else None)
    for row in history.cycles:
        if row.problem:  # said in full below the table
            table.add_row(row.cycle_id, "", "[red]unreadable[/]", "", "", "", "", "", "", "",
                          "")
            continue
        candidates = [m for m in row.models if m.name.startswith("candidate")]
        best = max((m.map50_95 for m in candidates if m.map50_95 is not None), default=None)
        champion = next((m for m in row.models if m.name.startswith("champion")), None)
        scores = "" if not row.models else (
            f"{metric(best)} / {metric(champion.map50_95) if champion else 'none'}")
        decision = (f"v{row.promoted_version} promoted" if row.promoted_version
                    else "; ".join(f"v{v}: {r}" for v, r in row.decisions.items())
                    if row.decisions else row.trigger if row.status == "skipped" else "")
        quarantined = "; ".join(f"{q.drop_id}: {', '.join(q.problems)}"
                                for q in row.quarantined)
        hard = ", ".join(f"{k} {v}" for k, v in sorted(row.hard_by_reason.items()))
        total = sum(row.stage_seconds.values())
        table.add_row(row.cycle_id, row.started_at or "", row.status,
                      f"{row.new_scenes} / {row.new_annotations}", quarantined,
                      str(row.chips or ""), hard, row.dataset_version, scores, decision,
                      duration(total) if total else "")
    console.print(table)
    for row in history.cycles:
        if row.problem:
            console.print(f"[red]cycle {row.cycle_id}:[/] {row.problem} ({row.report})",
                          highlight=False, soft_wrap=True)
    if not history.champion_timeline:
        console.print(f"{history.model_name}: no champion yet")
        return
    timeline = Table("version", "since", "how", "by", "replaced", "reason",
                     title=f"{history.model_name}: champion timeline")
    for event in history.champion_timeline:
        timeline.add_row(f"v{event.version}" + (" (champion)" if event.current else ""),
                         event.at, event.action.replace("_", " "), event.by,
                         f"v{event.replaced_version}" if event.replaced_version else "",
                         event.reason)
    console.print(timeline)
