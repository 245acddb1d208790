"""``autoretrain mine``: hard chips from a model's mistakes on one scene."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrain_lib.cli.options import MlflowUriOption
from retrain_lib.cli.render import Table, console
from retrain_lib.core.console import handle_errors

__all__ = ["mine_command"]


@handle_errors
def mine_command(
    scene: Annotated[Path, typer.Option(help="Scene GeoTIFF.")],
    truth: Annotated[Path, typer.Option(help="Its new annotations (GeoJSON).")],
    out: Annotated[Path, typer.Option(help="Folder for the hard-chip shard and manifest.")],
    pred: Annotated[Path | None, typer.Option(
        help="The champion's stored detections of this scene (GeoJSON).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Or detect now with these weights or models:/ URI.")] = None,
    classes: Annotated[str | None, typer.Option(
        help="Comma-separated class names (or take them from --config).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="Object-type config for classes, tiling and mining limits.")] = None,
    model_version: Annotated[str, typer.Option(
        help="Version recorded as the model that erred.")] = "unknown",
    device: Annotated[str | None, typer.Option(help="cpu or a CUDA index, with --model.")] = None,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Turn a model's false positives and misses on a scene into hard training chips."""
    from retrain_lib.core.config import ObjectTypeConfig, load_object_type_config
    from retrain_lib.core.errors import ConfigError
    from retrain_lib.stages.mining import SceneToMine, mine_hard_examples

    if (pred is None) == (model is None):
        raise ConfigError("give exactly one of --pred (stored detections) or --model")
    if config is not None:
        cfg = load_object_type_config(config)
    elif classes:
        cfg = ObjectTypeConfig(name="cli", classes=[c.strip() for c in classes.split(",")])
    else:
        raise ConfigError("give --classes car,truck or --config configs/object_types/X.yaml")
    if pred is None:
        from retrain_lib.stages.inference import (
            DetectOptions,
            detect_scene,
            load_detector,
            write_detections,
        )

        detector = load_detector(str(model), device=device, tracking_uri=mlflow_uri)
        with console.status(f"detecting on {scene.name}"):
            detections = detect_scene(scene, detector, DetectOptions(
                tiling=cfg.tiling, conf=cfg.mining.conf_threshold))
        pred = out / "predictions" / f"{scene.stem}.geojson"
        write_detections(detections, pred)
        if model_version == "unknown":
            model_version = detections.model.version or detections.model.name
    result = mine_hard_examples([SceneToMine(scene, truth, pred, scene.stem)], cfg, out,
                                model_version=model_version, cycle_id="cli")
    table = Table("reason", "hard chips", "candidates", title=f"hard examples in {scene.name}")
    for reason, count in result.counts.items():
        table.add_row(reason, str(count), str(result.candidates.get(reason, 0)))
    console.print(table)
    console.print(f"duplicates dropped: {result.duplicates}, over the cap: {result.capped}; "
                  f"manifest: {out / 'manifest.json'}")

