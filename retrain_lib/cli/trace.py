"""``autoretrain trace``: from a detection, a model version, a dataset version or a scene back
along everything that went into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from retrain_lib.cli.options import (
    DEFAULT_CONFIGS,
    ConfigDirOption,
    MlflowUriOption,
    StorageOption,
)
from retrain_lib.cli.render import console, err_console
from retrain_lib.core.console import handle_errors
from retrain_lib.core.errors import InputError

if TYPE_CHECKING:
    from retrain_lib.cycle.trace import TraceLink

__all__ = ["trace_command"]

DETECTION_SUFFIXES = (".geojson", ".json", ".gpkg")
MARKS = {"ok": "", "broken": "[bold red]BROKEN[/] ", "gone": "[yellow]GONE[/] ",
         "unverified": "[dim]unverified[/] "}
SHOWN_DETAILS = {
    "training_run": ("params", "tags", "final_metrics"),
    "dataset": ("instances_per_class", "chips_per_region", "hard_by_reason", "test_scenes",
                "trained_versions"),
    "model_version": ("decision_reason", "decided_by", "decided_at", "metrics"),
    "scene": ("model_versions", "dataset_versions"),
    "drop": ("source", "manifest_sha256"),
    "chip": ("mined_with_version", "label_revision", "label_revision_is_current"),
}


def _point(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--at {text!r}: expected X,Y (two numbers and a comma)") from None
    return x, y


def _tree(link: TraceLink, tree: Any) -> None:
    branch = tree.add(f"{MARKS[link.status]}{link.title}", highlight=False)
    if link.problem:
        branch.add(f"[red]{link.problem}[/]" if link.status == "broken" else link.problem,
                   highlight=False)
    for key in SHOWN_DETAILS.get(link.kind, ()):
        value = link.details.get(key)
        if value not in (None, "", [], {}):
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            branch.add(f"[dim]{key}:[/] {text}", highlight=False)
    for child in link.children:
        _tree(child, branch)


@handle_errors
def trace_command(
    object_type: Annotated[str, typer.Argument(help="Object type, e.g. vehicle.")],
    target: Annotated[str, typer.Argument(help=(
        "Where to start: a predictions file (.geojson or .gpkg; a local path or a key under "
        "the storage root) with --feature or --at; a model version (3, @champion, "
        "models:/<name>/3); a dataset version (ds-…); or a scene id."))],
    feature: Annotated[int | None, typer.Option(
        help="The detection: its feature index in the file (from 0).")] = None,
    at: Annotated[str | None, typer.Option(
        help="The detection at this point X,Y (the file's CRS unless --at-crs); for a model "
             "or dataset version, the place whose chips to list (lon,lat by default).")] = None,
    at_crs: Annotated[str | None, typer.Option(help="CRS of --at, e.g. EPSG:4326.")] = None,
    ancestors: Annotated[int, typer.Option(
        min=0, help="Warm-start parents to follow, each traced in full.")] = 1,
    radius: Annotated[float, typer.Option(
        min=0.0, help="Chips within this many metres of the place (0: those covering it).")] = 0.0,
    verify: Annotated[bool, typer.Option(
        help="Check every stored hash (scenes are hashed whole).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
    configs: ConfigDirOption = DEFAULT_CONFIGS,
    storage: StorageOption = None,
    mlflow_uri: MlflowUriOption = None,
) -> None:
    """Follow a detection (or a model, dataset or scene) back to what went into it.

    Exits 1 when a stored hash no longer matches (a broken link); links whose records were
    deleted are shown as GONE with what is still known.
    """
    import os

    from rich.tree import Tree

    from retrain_lib.core.config import load_object_type_config
    from retrain_lib.core.settings import default_storage_uri
    from retrain_lib.cycle.settings import CycleSettings
    from retrain_lib.cycle.trace import Tracer, count_links

    # The weights are fetched to be hashed; MLflow's progress bars would bury the tree.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = load_object_type_config(configs / f"{object_type}.yaml")
    settings = CycleSettings(storage_uri=storage or default_storage_uri(), mlflow_uri=mlflow_uri)
    tracer = Tracer(cfg, settings, ancestors=ancestors, radius_m=radius, verify=verify)
    point = _point(at)
    is_file = target.lower().endswith(DETECTION_SUFFIXES) or Path(target).is_file()
    if is_file:
        link = tracer.detection(target, feature=feature, at=point, at_crs=at_crs)
    else:
        if feature is not None:
            raise InputError(f"--feature picks a detection of a predictions file; {target!r} "
                             "is not one")
        location = None
        if point is not None:
            location = _lonlat(point, at_crs)
        if target.startswith("ds-"):
            link = tracer.dataset(target, location=location)
        elif target.startswith(("models:/", "@")) or target.lstrip("v").isdigit():
            link = tracer.model_version(target, location=location)
        else:
            if point is not None:
                raise InputError(f"--at picks a place for a detection file, a model version or "
                                 f"a dataset version; {target!r} is a scene id")
            link = tracer.scene(target)
    counts = count_links(link)
    if as_json:
        typer.echo(json.dumps(link.model_dump(mode="json"), indent=1))
    else:
        tree = Tree(f"[bold]trace[/] {object_type} {target}", highlight=False)
        _tree(link, tree)
        console.print(tree)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if counts.get("broken"):
        err_console.print(f"[red]error:[/] {counts['broken']} broken link(s) ({summary}): a "
                          "stored file no longer matches the hash recorded for it",
                          highlight=False)
        raise typer.Exit(1)
    err_console.print(f"{sum(counts.values())} link(s): {summary}", highlight=False)


def _lonlat(point: tuple[float, float], crs: str | None) -> tuple[float, float]:
    import shapely

    from retrain_lib.geo.crs import WGS84, reproject_geometries

    if crs is None:
        return point
    moved = reproject_geometries(shapely.Point(point), crs, WGS84)
    return float(moved.x), float(moved.y)
