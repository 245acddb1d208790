"""``autoretrain synth`` and ``autoretrain tile``: synthetic drops, and chips from a scene."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrain_lib.cli.render import Table, console, warn
from retrain_lib.core.console import handle_errors

__all__ = ["synth", "tile_command"]


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

    from retrain_lib.core.errors import ConfigError
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop, plan_objects

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
        from retrain_lib.core.config import load_object_type_config

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

    from retrain_lib.core.config import TilingConfig, format_validation_error
    from retrain_lib.core.errors import ConfigError
    from retrain_lib.stages.tiling import tile_scene

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
        warn(message)
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

