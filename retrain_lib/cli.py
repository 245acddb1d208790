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



def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
