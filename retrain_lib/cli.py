"""The ``autoretrain`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input. Errors derived from
:class:`retrain_lib.errors.RetrainError` are printed as one readable message; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from retrain_lib import __version__
from retrain_lib.errors import RetrainError

F = TypeVar("F", bound=Callable[..., Any])

# Piped output (logs, CI) gets a wide fixed width so tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

app = typer.Typer(
    name="autoretrain",
    help="Continuous retraining of object detectors for overhead imagery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Object-type configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def handle_errors(func: F) -> F:
    """Turn RetrainError into one red line and its exit code (1 failed work, 2 bad input)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RetrainError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True,
                              soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"autoretrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                          is_eager=True, help="Print the version.")] = False,
) -> None:
    """AutoRetrain keeps detectors for satellite and aerial imagery improving as data arrives."""


@config_app.command("validate")
@handle_errors
def config_validate(
    paths: Annotated[list[Path], typer.Argument(help="Object-type YAML files or directories.")],
) -> None:
    """Validate object-type configs; print one line per problem."""
    from retrain_lib.config import load_object_type_config
    from retrain_lib.errors import ConfigError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise ConfigError(f"{path}: no *.yaml config files in this directory")
            files.extend(found)
        else:
            files.append(path)
    table = Table("config", "type", "classes", "schedule", "runner", title=None)
    problems: list[str] = []
    for file in files:
        try:
            cfg = load_object_type_config(file)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        table.add_row(str(file), cfg.name, ", ".join(cfg.classes), str(cfg.schedule),
                      cfg.runner.kind)
    if table.row_count:
        console.print(table)
    if problems:
        raise ConfigError("\n".join(problems))
    console.print(f"[green]{len(files)} config(s) valid[/]")


@config_app.command("docs")
@handle_errors
def config_docs(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the config reference (Markdown) generated from the config models."""
    from retrain_lib.config import config_reference_markdown

    text = config_reference_markdown()
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        console.print(f"wrote {out}")


# --- stage commands are registered below (one block per stage) ---------------------------


# --- synth: synthetic drops for the demo, tests and benchmarks ---
@app.command("synth")
@handle_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder for the drops: OUT/<drop_id>/.")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="Object-type YAML whose classes to draw.")] = None,
    classes: Annotated[str | None, typer.Option(
        "--classes", help="Comma-separated class names (default: car,truck).")] = None,
    drops: Annotated[int, typer.Option(help="Number of drops.")] = 1,
    scenes_per_drop: Annotated[int, typer.Option(help="Scenes in each drop.")] = 1,
    size: Annotated[int, typer.Option(help="Scene width and height in pixels.")] = 1024,
    region: Annotated[str, typer.Option(help="Background: vegetated or arid.")] = "vegetated",
    gsd: Annotated[float, typer.Option(help="Ground sample distance, metres.")] = 0.5,
    epsg: Annotated[int, typer.Option(help="Projected CRS of the scenes.")] = 32633,
    objects_per_class: Annotated[int, typer.Option(help="Objects of each class.")] = 20,
    decoys: Annotated[int, typer.Option(help="Unannotated look-alikes per scene.")] = 10,
    clusters: Annotated[int, typer.Option(
        help="0: objects spread uniformly; N: objects in N lots, decoys scattered.")] = 0,
    nodata_border: Annotated[int, typer.Option(help="Nodata frame width, pixels.")] = 0,
    bands: Annotated[int, typer.Option(help="3 (RGB) or 4 (RGB + NIR).")] = 3,
    uint16: Annotated[bool, typer.Option(
        "--uint16", help="12-bit values (1..4095) in uint16 instead of uint8.")] = False,
    seed: Annotated[int, typer.Option(help="Seed; each scene gets its own from it.")] = 0,
    prefix: Annotated[str | None, typer.Option(
        help="Id prefix of drops and scenes (default: <region>-s<seed>).")] = None,
    annotations_epsg: Annotated[int | None, typer.Option(
        help="Write annotations in this CRS (e.g. 4326) instead of the scene CRS.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write into drop folders that already hold files.")] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress",
        help="Progress bars (default: on for scenes of 4096 px or more).")] = None,
) -> None:
    """Write synthetic drops: georeferenced scenes and their annotations."""
    import numpy as np

    from retrain_lib.errors import ConfigError
    from retrain_lib.synthetic import SceneSpec, make_drop, plan_objects

    if config is not None and classes is not None:
        raise ConfigError("--config and --classes: give one of them, not both")
    for name, value in (("--drops", drops), ("--scenes-per-drop", scenes_per_drop)):
        if value < 1:
            raise ConfigError(f"{name}: got {value}; expected at least 1")
    if seed < 0:
        raise ConfigError(f"--seed: got {seed}; expected an integer >= 0")
    if region not in ("vegetated", "arid"):
        raise ConfigError(f"--region: got {region!r}; expected vegetated or arid")
    if config is not None:
        from retrain_lib.config import load_object_type_config

        class_names = tuple(load_object_type_config(config).classes)
    elif classes is not None:
        class_names = tuple(c.strip() for c in classes.split(","))
        if any(not c for c in class_names):
            raise ConfigError(f"--classes: got {classes!r}; expected comma-separated names, "
                              "e.g. car,truck")
    else:
        class_names = ("car", "truck")
    prefix = prefix or f"{region}-s{seed}"
    plans: list[tuple[str, list[SceneSpec]]] = []
    for d in range(drops):
        drop_id = f"{prefix}-d{d:02d}"
        specs = []
        for i in range(scenes_per_drop):
            # Independent per-scene seeds, so runs with neighbouring --seed share no scene.
            scene_seed = int(np.random.SeedSequence([seed, d, i]).generate_state(1)[0])
            specs.append(SceneSpec(
                scene_id=f"{drop_id}-{i:02d}", width=size, height=size, gsd_m=gsd, epsg=epsg,
                region=region, classes=class_names,  # type: ignore[arg-type]
                objects_per_class=objects_per_class, decoys=decoys, clusters=clusters,
                nodata_border=nodata_border, bands=bands,  # type: ignore[arg-type]
                dtype="uint16" if uint16 else "uint8", seed=scene_seed))
        for spec in specs:  # fail before writing anything if objects do not fit
            plan_objects(spec)
        drop_dir = out / drop_id
        if not overwrite and drop_dir.is_dir() and any(drop_dir.iterdir()):
            raise ConfigError(f"{drop_dir}: drop folder already holds files; choose another "
                              "--seed or --prefix, or pass --overwrite")
        plans.append((drop_id, specs))
    show_progress = size >= 4096 if progress is None else progress
    table = Table("drop folder", "scene", "size (px)", "GSD (m)", "region", "objects",
                  "decoys", title=None)
    total = 0
    for drop_id, specs in plans:
        for scene in make_drop(out / drop_id, specs, progress=show_progress,
                               annotations_epsg=annotations_epsg):
            counts = scene.counts()
            n_decoys = counts.pop("decoys")
            table.add_row(str(scene.path.parent), scene.spec.scene_id, f"{size}x{size}",
                          f"{gsd:g}", region, " ".join(f"{k}={v}" for k, v in counts.items()),
                          str(n_decoys))
            total += 1
    console.print(table)
    console.print(f"[green]wrote {total} scene(s) in {len(plans)} drop(s) under {out}; "
                  "each scene is <scene>.tif + <scene>.geojson[/]")


@app.command("detect")
@handle_errors
def detect_command(
    scene: Annotated[Path, typer.Argument(help="Scene GeoTIFF (georeferenced).")],
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from retrain_lib.config import TilingConfig, format_validation_error
    from retrain_lib.errors import ConfigError
    from retrain_lib.inference import (
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
    with Progress(TextColumn("detect {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tiles"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task(scene.name, total=None)
        result = detect_scene(scene, detector, options, scene_id=scene_id,
                              on_progress=lambda done, total: bar.update(
                                  task, completed=done, total=total))
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


@app.command("evaluate")
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
    import os

    from retrain_lib.errors import ConfigError
    from retrain_lib.evaluate import AreaRanges, evaluate_files

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
    data = metrics.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    for note in metrics.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table("class", "mAP50-95", "mAP50", f"P@{conf:g}", f"R@{conf:g}", "truth",
                  "pred", title=f"{metrics.n_scenes} scene(s), IoU {iou:g} -> {out}",
                  title_justify="left")
    for name, values in metrics.per_class.items():
        table.add_row(name, cell(values["map50_95"]), cell(values["map50"]),  # type: ignore[arg-type]
                      cell(values["precision"]), cell(values["recall"]),  # type: ignore[arg-type]
                      str(values["n_truth"]), str(values["n_pred"]))
    table.add_row("all", cell(metrics.map50_95), cell(metrics.map50), cell(metrics.precision),
                  cell(metrics.recall), str(metrics.n_truth), str(metrics.n_pred),
                  style="bold")
    console.print(table)
    console.print(f"mAP75 {cell(metrics.map75)}  small {cell(metrics.map_small)}  medium "
                  f"{cell(metrics.map_medium)}  large {cell(metrics.map_large)}")


# --- train: `autoretrain train` == `python -m retrain_lib.train` (retrain_lib/train.py) ---
@app.command("train")
@handle_errors
def train(
    data: Annotated[str, typer.Option(help="Dataset version: folder or data.yaml (path, "
                                      "file:// or s3:// URI).")],
    out: Annotated[str, typer.Option(help="Output directory or storage URI prefix.")],
    weights: Annotated[str | None, typer.Option(help="Initial weights: .pt (path or URI), "
                                                "models:/name@alias, or a model YAML. Default: "
                                                "the config's initial_model.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Image size in pixels.")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, or CUDA indexes like 0 or 0,1.")
                      ] = None,
    workers: Annotated[int | None, typer.Option(help="Dataloader workers.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Extra Ultralytics train argument key=value (repeatable).")] = None,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="Draw and upload "
                                               "Ultralytics' plots.")] = None,
    config: Annotated[Path | None, typer.Option(help="Object-type YAML: gives the classes, the "
                                                "object type and training defaults.")] = None,
    classes: Annotated[str | None, typer.Option(help="Expected class names, comma-separated "
                                                "(default: the config's, else the dataset's).")
                       ] = None,
    class_mismatch: Annotated[str | None, typer.Option(
        help="Weights trained for other classes: adapt (new head) or refuse.")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default "
                                                   "$MLFLOW_TRACKING_URI).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
    object_type: Annotated[str | None, typer.Option(help="Tag: object type.")] = None,
    dataset_version: Annotated[str | None, typer.Option(help="Tag: dataset version.")] = None,
    parent_model_version: Annotated[str | None, typer.Option(
        help="Tag: registered model version of the initial weights.")] = None,
    cycle_id: Annotated[str | None, typer.Option(help="Tag: retraining cycle id.")] = None,
    candidate: Annotated[str | None, typer.Option(help="Tag: candidate name.")] = None,
    scratch: Annotated[str | None, typer.Option(help="Scratch root (default "
                                                "$AUTORETRAIN_SCRATCH or the temp dir).")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard an interrupted attempt instead of "
                                        "resuming it.")] = False,
    result_file: Annotated[Path | None, typer.Option(
        help="Also write the result JSON here (e.g. /airflow/xcom/return.json in a pod).")
                           ] = None,
) -> None:
    """Fine-tune a YOLO detector; the last line printed is the result JSON."""
    from retrain_lib.train import parse_param, run_cli

    options: dict[str, object] = {
        "data": data, "out": out, "weights": weights, "epochs": epochs, "imgsz": imgsz,
        "batch": batch, "device": device, "workers": workers, "seed": seed, "plots": plots,
        "class_mismatch": class_mismatch, "mlflow_uri": mlflow_uri, "experiment": experiment,
        "run_name": run_name, "object_type": object_type, "dataset_version": dataset_version,
        "parent_model_version": parent_model_version, "cycle_id": cycle_id,
        "candidate": candidate, "scratch": scratch,
        "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        "params": dict(parse_param(p) for p in param or []),
    }
    if config is not None:
        from retrain_lib.config import load_object_type_config

        cfg = load_object_type_config(config)
        defaults = {"classes": cfg.classes, "object_type": cfg.name,
                    "weights": cfg.training.initial_model, "epochs": cfg.training.epochs,
                    "imgsz": cfg.training.imgsz, "batch": cfg.training.batch,
                    "device": cfg.training.device, "workers": cfg.training.workers,
                    "seed": cfg.training.seed}
        params = options["params"]
        options.update({k: v for k, v in defaults.items()
                        if options.get(k) is None and k not in params})  # type: ignore[operator]
    run_cli(options, fresh=fresh, result_file=result_file)


@app.command("tile")
@handle_errors
def tile_command(
    scene: Annotated[Path, typer.Argument(help="Scene GeoTIFF (georeferenced).")],
    labels: Annotated[Path, typer.Option(
        "--labels", help="Annotations: GeoJSON polygons with a 'class' property, any CRS.")],
    classes: Annotated[str, typer.Option(
        "--classes", help="Class names in model index order, comma-separated: car,truck.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Shard root; the shard is written to OUT/<params_hash>/<scene_id>.")],
    tile_size: Annotated[int | None, typer.Option(
        "--tile-size", help="Tile edge in pixels (default 640).")] = None,
    tile_size_m: Annotated[float | None, typer.Option(
        "--tile-size-m", help="Tile edge in metres, converted with the scene's GSD.")] = None,
    overlap: Annotated[float, typer.Option(
        "--overlap", help="Overlap: a fraction of the tile when < 1, else pixels.")] = 0.2,
    image_format: Annotated[str, typer.Option("--format", help="Chip encoding: jpg or png.")
                            ] = "jpg",
    workers: Annotated[int, typer.Option("--workers", help="Worker processes.")] = 2,
    aoi: Annotated[Path | None, typer.Option(
        "--aoi", help="GeoJSON polygon(s) where annotations are complete; tiles outside "
        "are skipped.")] = None,
) -> None:
    """Cut a scene and its annotations into YOLO chips, labels and a tile index."""
    from pydantic import ValidationError

    from retrain_lib.config import TilingConfig, format_validation_error
    from retrain_lib.errors import ConfigError
    from retrain_lib.tiling import tile_scene

    if tile_size is not None and tile_size_m is not None:
        raise ConfigError("give --tile-size (pixels) or --tile-size-m (metres), not both")
    try:
        params = TilingConfig(tile_size=tile_size, tile_size_m=tile_size_m, overlap=overlap,
                              image_format=image_format, workers=workers)
    except ValidationError as exc:
        raise ConfigError(format_validation_error("command-line options", exc)) from None
    class_list = [c.strip() for c in classes.split(",") if c.strip()]
    result = tile_scene(scene, labels, class_list, out, params, aoi=aoi, progress=True)
    for message in (*result.notes, *result.rejected_features):
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    if result.reused:
        console.print(f"shard {result.shard_dir} is already complete for these parameters "
                      "and inputs; nothing to do")
    table = Table("tiles", "count", title=f"{result.scene_id} -> {result.shard_dir}",
                  title_justify="left")
    table.add_row("grid", f"{result.tiles_total} ({result.tile_px} px, overlap "
                  f"{result.overlap_px} px)")
    table.add_row("written", f"{result.tiles_written} ({result.positive_tiles} with objects, "
                  f"{result.background_tiles} background)")
    for reason, count in result.skipped.items():
        table.add_row(f"skipped: {reason}", str(count))
    table.add_row("objects", ", ".join(f"{n} {name}" for name, n in
                                       result.objects_per_class.items()) or "0")
    table.add_row("boxes written", str(result.boxes_written))
    table.add_row("partial objects masked", str(result.partial_objects))
    table.add_row("time", f"{result.elapsed_s:.1f} s")
    table.add_row("throughput", f"{result.megapixels_per_s:.1f} MP/s")
    console.print(table)


ConfigDirOption = Annotated[Path, typer.Option(
    "--configs", help="Folder of object-type configs.", envvar="AUTORETRAIN_CONFIGS")]
MlflowUriOption = Annotated[str | None, typer.Option(
    "--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a local "
    "SQLite file).")]


def _registry_for(object_type: str, configs: Path, mlflow_uri: str | None) -> Any:
    from retrain_lib.config import load_object_type_config
    from retrain_lib.registry import ModelRegistry

    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    return ModelRegistry(cfg.registered_model_name, mlflow_uri)


@app.command("models")
@handle_errors
def models_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    configs: ConfigDirOption = Path("configs/object_types"),
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
        table.add_row(v.version, ",".join(v.aliases), _fmt(m.get("map50_95")),
                      _fmt(m.get("map50")), v.parent or "", v.tags.get("dataset_version", ""),
                      v.tags.get("cycle_id", ""), v.tags.get("decision", ""),
                      v.tags.get("decision_reason", ""))
    console.print(table)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@app.command("promote")
@handle_errors
def promote_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    version: Annotated[str, typer.Option("--version", help="Model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")],
    configs: ConfigDirOption = Path("configs/object_types"),
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Move the champion alias to a version by hand, with a reason."""
    registry = _registry_for(object_type, configs, mlflow_uri)
    previous = registry.set_champion(version, reason)
    console.print(f"{registry.model_name}: champion is now v{version} "
                  f"(was {'v' + previous if previous else 'none'})")


@app.command("rollback")
@handle_errors
def rollback_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    to: Annotated[str, typer.Option("--to", help="Version to restore as champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")],
    configs: ConfigDirOption = Path("configs/object_types"),
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Point the champion alias back at an earlier version, with a reason."""
    registry = _registry_for(object_type, configs, mlflow_uri)
    previous = registry.rollback(to, reason)
    console.print(f"{registry.model_name}: rolled back to v{to} "
                  f"(was {'v' + previous if previous else 'none'})")



@app.command("mine")
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
    from retrain_lib.config import ObjectTypeConfig, load_object_type_config
    from retrain_lib.errors import ConfigError
    from retrain_lib.mining import SceneToMine, mine_hard_examples

    if (pred is None) == (model is None):
        raise ConfigError("give exactly one of --pred (stored detections) or --model")
    if config is not None:
        cfg = load_object_type_config(config)
    elif classes:
        cfg = ObjectTypeConfig(name="cli", classes=[c.strip() for c in classes.split(",")])
    else:
        raise ConfigError("give --classes car,truck or --config configs/object_types/X.yaml")
    if pred is None:
        from retrain_lib.inference import (
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


@app.command("cycle")
@handle_errors
def cycle_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    configs: ConfigDirOption = Path("configs/object_types"),
    storage: Annotated[str | None, typer.Option(
        help="Storage root (default $AUTORETRAIN_STORAGE or .autoretrain/storage).")] = None,
    mlflow_uri: MlflowUriOption = None,
    cycle_id: Annotated[str | None, typer.Option(help="Default: a UTC timestamp.")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even without enough new data.")] = False,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override epochs.")] = None,
) -> None:
    """Run one whole retraining cycle in this process, without Airflow (for replay and debug)."""
    from datetime import UTC, datetime

    from retrain_lib.config import load_object_type_config
    from retrain_lib.cycle import CycleSettings, run_cycle, safe_cycle_id

    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    settings = CycleSettings(**({"storage_uri": storage} if storage else {}),
                             mlflow_uri=mlflow_uri)
    cid = safe_cycle_id(cycle_id or datetime.now(UTC).strftime("manual_%Y%m%dT%H%M%S"))
    report = run_cycle(cfg, settings, cid, force=force, epochs=epochs,
                       on_stage=lambda name, _v: console.print(f"[cyan]>[/] {name} done"))
    console.print(f"cycle {cid}: [bold]{report['status']}[/] "
                  f"({report['check']['reason']}); report: {report['report']}")


@app.command("demo")
@handle_errors
def demo_command(
    root: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path(
        ".autoretrain/demo"),
    configs: ConfigDirOption = Path("configs/object_types"),
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
    from retrain_lib.demo import DemoSize, decision_lines, model_rows, run_demo, summary_rows

    result = run_demo(root, configs_dir=configs, object_type=object_type,
                      size=DemoSize(scenes=scenes, size=size, objects_per_class=objects_per_class,
                                    decoys=max(1, objects_per_class // 2), epochs=epochs,
                                    finetune_epochs=finetune_epochs, seed=seed),
                      database_url=database_url, log=lambda m: console.print(f"[cyan]>[/] {m}"))
    regions = sorted({r for c in result.cycles for _, m in model_rows(c.report)
                      for r in m.get("regions", {})})
    for cycle in result.cycles:
        report = cycle.report
        console.print()
        facts = Table("", "", title=f"{cycle.name}: run {cycle.run.run_id} ({report['status']}, "
                      f"{cycle.run.seconds:.0f} s)", title_justify="left", show_header=False)
        for label, value in summary_rows(report):
            facts.add_row(label, value)
        console.print(facts)
        models = Table("model", "mAP50", "mAP50-95", *(f"mAP50 {r}" for r in regions),
                       title="frozen test scenes (scene-level COCO)", title_justify="left")
        for label, metrics in model_rows(report):
            per_region = metrics.get("regions", {})
            models.add_row(label, _fmt(metrics.get("map50")), _fmt(metrics.get("map50_95")),
                           *(_fmt(per_region.get(r, {}).get("map50")) for r in regions))
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


# --- up: Airflow standalone + MLflow UI on the demo's storage ---
@app.command("up")
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
    from retrain_lib.demo import run_up

    run_up(root, configs=configs, airflow_port=airflow_port, mlflow_port=mlflow_port,
           log=lambda m: console.print(f"[cyan]>[/] {m}", highlight=False))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
