"""``autoretrain detect`` and ``autoretrain evaluate``: scene inference and COCO scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrain_lib.cli.render import Table, console, warn
from retrain_lib.core.console import handle_errors

__all__ = ["detect_command", "evaluate_command"]


@handle_errors
def detect_command(
    scene: Annotated[str, typer.Argument(
        help="Scene GeoTIFF (georeferenced): a file, or s3://bucket/key read in place, window "
        "by window (endpoint and keys: AUTORETRAIN_S3_ENDPOINT_URL and the AWS variables).")],
    model: Annotated[str, typer.Option(
        "--model", help="Weights file (.pt) or MLflow URI, e.g. models:/autoretrain-vehicle"
        "@champion.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Detections: .geojson (scene CRS) or .gpkg (GeoPackage).")],
    tile_size: Annotated[int | None, typer.Option(
        "--tile-size", help="Tile edge in pixels (default 640, as for training chips).")] = None,
    tile_size_m: Annotated[float | None, typer.Option(
        "--tile-size-m", help="Tile edge in metres, converted with the scene's GSD.")] = None,
    overlap: Annotated[float, typer.Option(
        "--overlap", help="Overlap: a fraction of the tile when < 1, else pixels.")] = 0.2,
    conf: Annotated[float, typer.Option(
        "--conf", help="Lowest score kept (use 0.001 for output scored by COCO mAP).")] = 0.25,
    iou: Annotated[float, typer.Option("--iou", help="IoU of the per-tile NMS.")] = 0.7,
    batch: Annotated[int, typer.Option("--batch", help="Tiles per forward pass.")] = 16,
    device: Annotated[str | None, typer.Option(
        "--device", help="'cpu' or a CUDA index like '0' (default: GPU 0 if present).")] = None,
    merge: Annotated[str, typer.Option(
        "--merge", help="Cross-tile merge: nms (IoU), nmm (IoS, like SAHI) or none.")] = "nms",
    merge_threshold: Annotated[float, typer.Option(
        "--merge-threshold", help="IoU (nms) or IoS (nmm) above which boxes merge.")] = 0.5,
    wgs84: Annotated[Path | None, typer.Option(
        "--wgs84", help="Also write the detections in EPSG:4326 (lon/lat) to this file.")
                     ] = None,
    scene_id: Annotated[str | None, typer.Option(
        "--scene-id", help="Scene id written into each detection (default: file stem).")
                        ] = None,
    mlflow_uri: Annotated[str | None, typer.Option(
        "--mlflow-uri", help="MLflow tracking URI for models:/ URIs (default: "
        "$MLFLOW_TRACKING_URI or a local SQLite file).")] = None,
) -> None:
    """Detect objects over a whole scene and write georeferenced boxes."""
    from pydantic import ValidationError

    from retrain_lib.core.config import TilingConfig, format_validation_error
    from retrain_lib.core.console import progress_bar
    from retrain_lib.core.errors import ConfigError
    from retrain_lib.geo.raster import object_storage, scene_location
    from retrain_lib.stages.inference import (
        DetectOptions,
        detect_scene,
        load_detector,
        write_detections,
    )

    if tile_size is not None and tile_size_m is not None:
        raise ConfigError("give --tile-size (pixels) or --tile-size-m (metres), not both")
    try:
        tiling = TilingConfig(tile_size=tile_size, tile_size_m=tile_size_m, overlap=overlap)
    except ValidationError as exc:
        raise ConfigError(format_validation_error("command-line options", exc)) from None
    options = DetectOptions(tiling=tiling, conf=conf, iou=iou, batch=batch,
                            merge=merge,  # type: ignore[arg-type]  # checked by DetectOptions
                            merge_threshold=merge_threshold)
    if out.suffix.lower() not in (".geojson", ".json", ".gpkg"):
        raise ConfigError(f"--out {out}: use a .geojson or .gpkg file name")
    detector = load_detector(model, device=device, tracking_uri=mlflow_uri)
    scene_path = scene_location(scene)
    with object_storage(None), progress_bar(f"detect {scene_path.name}", unit="tiles",
                                            remaining=True) as bar:
        result = detect_scene(scene_path, detector, options, scene_id=scene_id,
                              on_progress=lambda done, total: bar.update(done, total))
    written = write_detections(result, out, wgs84_path=wgs84)
    stats = result.stats
    counts = {name: 0 for name in result.class_names}
    for k in result.classes.tolist():
        counts[result.class_names[k]] += 1
    table = Table("detect", "", title=f"{result.scene.scene_id} with {result.model.name} "
                  f"{result.model.version}", title_justify="left")
    table.add_row("tiles", f"{stats.tiles_total} ({stats.tile_px} px, overlap "
                  f"{stats.overlap_px} px; {stats.tiles_skipped_nodata} skipped as nodata)")
    per_class = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
    table.add_row("detections", f"{stats.boxes_out} ({per_class})" if stats.boxes_out else "0")
    table.add_row("merged away", f"{stats.boxes_raw - stats.boxes_out} of {stats.boxes_raw} "
                  f"tile boxes ({stats.boxes_cut_off} cut off by tile edges)")
    table.add_row("time", f"{stats.seconds_total:.1f} s (model {stats.seconds_model:.1f} s, "
                  f"waiting for tiles {stats.seconds_waiting_for_tiles:.1f} s)")
    rate = result.scene.megapixels / max(stats.seconds_total, 1e-9)
    table.add_row("throughput", f"{rate:.2f} MP/s")
    table.add_row("written", ", ".join(str(p) for p in written))
    console.print(table)


@handle_errors
def evaluate_command(
    pred: Annotated[list[Path], typer.Option(
        "--pred", help="Predictions GeoJSON ('class' and 'score' per feature); repeat for "
        "several scenes.")],
    truth: Annotated[list[Path], typer.Option(
        "--truth", help="Ground-truth GeoJSON ('class' per feature), one per --pred.")],
    out: Annotated[Path, typer.Option("--out", help="Write the metrics JSON here.")],
    scene: Annotated[list[Path] | None, typer.Option(
        "--scene", help="Scene GeoTIFF, one per --pred: boxes are compared in its pixels "
        "and size APs need it.")] = None,
    iou: Annotated[float, typer.Option(
        "--iou", help="IoU of a match for precision and recall.")] = 0.5,
    conf: Annotated[float, typer.Option(
        "--conf", help="Operating confidence for precision and recall.")] = 0.25,
    classes: Annotated[str | None, typer.Option(
        "--classes", help="The model's classes, comma-separated; every truth class must be "
        "one of them.")] = None,
    small_max_area: Annotated[float, typer.Option(
        "--small-max-area", help="Largest 'small' box area in px² (default 16x16).")] = 256.0,
    medium_max_area: Annotated[float, typer.Option(
        "--medium-max-area", help="Largest 'medium' box area in px² (default 48x48).")
                               ] = 2304.0,
) -> None:
    """Score predictions against ground truth (COCO mAP, per class, precision/recall)."""
    import json

    from retrain_lib.core.errors import ConfigError
    from retrain_lib.core.io import atomic_write_text
    from retrain_lib.stages.evaluate import AreaRanges, evaluate_files

    if not 0 < iou <= 1 or not 0 <= conf <= 1:
        raise ConfigError(f"--iou {iou} must be in (0, 1] and --conf {conf} in [0, 1]")
    try:
        ranges = AreaRanges(small_max_px=small_max_area, medium_max_px=medium_max_area)
    except ValueError as exc:
        raise ConfigError(f"--small-max-area/--medium-max-area: {exc}") from None
    class_list = None if classes is None else [c.strip() for c in classes.split(",")
                                               if c.strip()]
    metrics = evaluate_files(pred, truth, scene or None, class_names=class_list,
                             iou_threshold=iou, conf_threshold=conf, area_ranges=ranges)
    atomic_write_text(out, json.dumps(metrics.to_dict(), indent=2) + "\n")
    for note in metrics.notes:
        warn(note, label="note")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table("class", "mAP50-95", "mAP50", f"P@{conf:g}", f"R@{conf:g}", "truth",
                  "pred", title=f"{metrics.counts.scenes} scene(s), IoU {iou:g} -> {out}",
                  title_justify="left")
    for name, values in metrics.per_class.items():
        table.add_row(name, cell(values["map50_95"]), cell(values["map50"]),
                      cell(values["precision"]), cell(values["recall"]),
                      str(values["n_truth"]), str(values["n_pred"]))
    table.add_row("all", cell(metrics.map50_95), cell(metrics.map50), cell(metrics.precision),
                  cell(metrics.recall), str(metrics.counts.truth), str(metrics.counts.pred),
                  style="bold")
    console.print(table)
    console.print(f"mAP75 {cell(metrics.map75)}  small {cell(metrics.map_small)}  medium "
                  f"{cell(metrics.map_medium)}  large {cell(metrics.map_large)}")

