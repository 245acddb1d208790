"""``autoretrain demo`` and ``autoretrain up``: the demo, and the local stack over its data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrain_lib.cli.render import Table, console, metric
from retrain_lib.core.console import handle_errors

__all__ = ["demo_command", "up_command"]


@handle_errors
def demo_command(
    root: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path(
        ".autoretrain/demo"),
    configs: Annotated[Path | None, typer.Option(
        "--configs", envvar="AUTORETRAIN_CONFIGS",
        help="Folder of object-type configs (default: the checkout's configs/object_types, "
        "from any working folder).")] = None,
    object_type: Annotated[str, typer.Option("--type", help="Object type to demo.")] = "vehicle",
    scenes: Annotated[int, typer.Option(min=2, max=50, help="Scenes per region drop.")] = 6,
    size: Annotated[int, typer.Option(min=256, max=20000, help="Scene edge in pixels.")] = 768,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    objects_per_class: Annotated[int, typer.Option(
        min=1, help="Objects of each class per scene.")] = 16,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of cycle 1 (from scratch).")] = 40,
    finetune_epochs: Annotated[int, typer.Option(
        min=1, help="Epochs of cycle 2 (warm start from the champion).")] = 20,
    database_url: Annotated[str | None, typer.Option(
        help="Airflow metadata database (default: SQLite under --root).")] = None,
) -> None:
    """Two retraining cycles through Airflow on embedded defaults (SQLite, local runner, CPU)."""
    from retrain_lib.devtools.demo import (
        DemoSize,
        decision_lines,
        model_rows,
        run_demo,
        summary_rows,
    )

    result = run_demo(root, configs_dir=configs, object_type=object_type,
                      size=DemoSize(scenes=scenes, size=size, objects_per_class=objects_per_class,
                                    decoys=max(1, objects_per_class // 2), epochs=epochs,
                                    finetune_epochs=finetune_epochs, seed=seed),
                      database_url=database_url, log=lambda m: console.print(f"[cyan]>[/] {m}"))
    regions = sorted({r for c in result.cycles for _, m in model_rows(c.report)
                      for r in m.regions})
    for cycle in result.cycles:
        report = cycle.report
        console.print()
        facts = Table("", "", title=f"{cycle.name}: run {cycle.run.run_id} ({report.status}, "
                      f"{cycle.run.seconds:.0f} s)", title_justify="left", show_header=False)
        for label, value in summary_rows(report):
            facts.add_row(label, value)
        console.print(facts)
        models = Table("model", "mAP50", "mAP50-95", *(f"mAP50 {r}" for r in regions),
                       title="frozen test scenes (scene-level COCO)", title_justify="left")
        for label, scores in model_rows(report):
            models.add_row(label, metric(scores.map50), metric(scores.map50_95),
                           *(metric(scores.regions[r].map50 if r in scores.regions else None)
                             for r in regions))
        console.print(models)
        for i, line in enumerate(decision_lines(report)):
            console.print(("[bold]decision:[/] " if i == 0 else "  ") + line, highlight=False)
    stack = result.stack
    console.print(
        f"\n[bold]Done in {result.seconds / 60:.1f} min. Where to look[/]\n"
        f"  both UIs      autoretrain up --root {result.root}   (Airflow :8080, MLflow :5000)\n"
        f"  MLflow only   mlflow ui --backend-store-uri {stack.tracking_uri}\n"
        f"  models        autoretrain models {result.object_type} --configs "
        f"{result.config_path.parent} --mlflow-uri {stack.tracking_uri}\n"
        f"  reports       {stack.storage_root / 'cycles' / result.object_type}/<run>/report.md\n"
        f"  quarantine    {stack.storage_root / 'quarantine' / result.object_type} "
        "(reason.json per drop)\n"
        f"  run logs      {result.root / 'logs'}", highlight=False)


@handle_errors
def up_command(
    root: Annotated[Path, typer.Option(help="The demo's folder (storage, MLflow, Airflow home).")
                    ] = Path(".autoretrain/demo"),
    configs: Annotated[Path | None, typer.Option(
        "--configs", help="Object-type configs the DAGs are made from (default: the demo's, "
        "else configs/object_types).")] = None,
    airflow_port: Annotated[int, typer.Option(help="Airflow UI/API port.")] = 8080,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port.")] = 5000,
) -> None:
    """Start Airflow (standalone) and the MLflow UI locally, on the demo's storage; Ctrl-C stops."""
    from retrain_lib.devtools.local_stack import run_up

    run_up(root, configs=configs, airflow_port=airflow_port, mlflow_port=mlflow_port,
           log=lambda m: console.print(f"[cyan]>[/] {m}", highlight=False))

