"""Cut a georeferenced scene and its annotations into YOLO training chips.

:func:`tile_scene` turns one scene (GeoTIFF) plus its GeoJSON annotations into a shard::

    <out_dir>/<params_hash>/params.json           tiling parameters the hash stands for
    <out_dir>/<params_hash>/<scene_id>/images/<tile_id>.jpg|png
    <out_dir>/<params_hash>/<scene_id>/labels/<tile_id>.txt   YOLO: cls cx cy w h (0..1)
    <out_dir>/<params_hash>/<scene_id>/index.json  one record per grid tile (written last)

Policies (see docs/tiling.md for the reasoning):

- **Grid and edges.** Tiles step by ``tile - overlap`` pixels; the last tile of each row and
  column is shifted inward so it ends on the scene edge (no padding, so no fake border
  pixels). Every pixel is in at least one tile, and any object at most ``overlap`` pixels
  wide and high lies wholly inside at least one tile. A scene smaller than a tile gives one
  smaller chip.
- **Partially visible objects.** An object is labelled in a chip when at least
  ``min_visibility`` of its area lies inside the chip (box of the clipped polygon). When a
  chip shows a smaller part of an object, that part is blacked out (the same fill as nodata)
  and recorded under ``partial_objects`` in the tile index, so the model is never shown an
  unlabelled object as background.
- **Nodata and AOI.** Chips with more than ``max_nodata_fraction`` nodata are skipped. With an
  AOI, tiles that miss it are skipped, and pixels outside it count and are filled as nodata
  (annotations are only trusted inside the AOI).
- **Background chips.** Chips with no labelled object are kept at ``background_ratio`` per
  written positive chip, drawn in a seeded order that depends on the scene id only.
- **Radiometry.** uint8 scenes pass through unchanged. Other types get a per-band percentile
  stretch to 8 bit, computed once per scene from overviews or from a fixed sample of windows,
  so every chip of a scene (and inference) sees the same mapping.
- **Identity.** The shard directory is named by a hash of the tiling parameters and class
  list (:func:`params_hash`), shared by every scene tiled with them. A re-run is a no-op when
  the shard's ``index.json`` records the same source fingerprint: scene size plus SHA-256 of
  its first and last MiB, SHA-256 of the annotation and AOI files, and the resolved classes.
  Shards are built in a hidden temp directory and renamed into place when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from retrain_lib.core.classes import ClassMapper
from retrain_lib.core.config import TilingConfig
from retrain_lib.core.console import progress_bar
from retrain_lib.core.errors import ConfigError, StorageError
from retrain_lib.core.io import atomic_write_text, file_sha256
from retrain_lib.geo.annotations import Annotations, load_annotations, load_aoi
from retrain_lib.geo.raster import (
    SceneInfo,
    gdal_env,
    open_raster,
    raster_fingerprint,
    raster_uri,
    resolve_tile_px,
    scene_info,
    scene_stretch,
    select_bands,
)
from retrain_lib.geo.windows import PixelWindow, tile_grid
from retrain_lib.stages.tiling_plan import background_order, plan_tiles, work_chunks
from retrain_lib.stages.tiling_workers import TileExecutor, TileOutcome, WorkerSetup

__all__ = ["SKIP_REASONS", "TilingResult", "params_hash", "tile_scene"]

# Bump when the chips or labels written for the same parameters change.
TILER_VERSION = 1
SKIP_REASONS = ("nodata", "outside_aoi", "background_cap")


# --------------------------------------------------------------------------- shard identity


def params_hash(params: TilingConfig, classes: Sequence[str]) -> str:
    """Name of the shard directory for these tiling parameters and class list.

    ``workers`` does not change the output and is left out.
    """
    payload = {"tiler_version": TILER_VERSION, "classes": list(classes),
               "params": params.model_dump(mode="json", exclude={"workers"})}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TilingResult:
    """What :func:`tile_scene` did (also rebuilt from ``index.json`` on a no-op re-run).

    Attributes:
        scene_id: The scene's id (file stem unless given).
        shard_dir: ``<out_dir>/<params_hash>/<scene_id>``.
        index_path: The tile index (``index.json`` in the shard).
        params_hash: Hash of tiling parameters and class list (the shard's parent directory).
        reused: True when an identical shard existed and nothing was done.
        tile_px: Tile edge in pixels used for this scene.
        overlap_px: Overlap in pixels used for this scene.
        tiles_total: Tiles in the grid.
        tiles_written: Chips written (positive + background).
        positive_tiles: Written chips with at least one labelled object.
        background_tiles: Written chips without objects.
        skipped: Grid tiles not written, by reason (see ``SKIP_REASONS``).
        objects_per_class: Annotated objects labelled in at least one written chip.
        boxes_written: Label lines written (an object in two chips counts twice).
        partial_objects: Object parts blacked out in written chips (below min_visibility).
        notes: Repairs and ignored annotations worth telling the user.
        rejected_features: Features ignored, each with its reason.
        elapsed_s: Wall time of the run that built the shard.
        megapixels_per_s: Scene megapixels per second of that run.
    """

    scene_id: str
    shard_dir: Path
    index_path: Path
    params_hash: str
    reused: bool
    tile_px: int
    overlap_px: int
    tiles_total: int
    tiles_written: int
    positive_tiles: int
    background_tiles: int
    skipped: Mapping[str, int]
    objects_per_class: Mapping[str, int]
    boxes_written: int
    partial_objects: int
    notes: tuple[str, ...] = ()
    rejected_features: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    megapixels_per_s: float = 0.0

    @classmethod
    def from_index(cls, index_path: Path, *, reused: bool) -> TilingResult:
        """Rebuild the result recorded in a shard's ``index.json``."""
        index = json.loads(index_path.read_text(encoding="utf-8"))
        stats = index["stats"]
        return cls(
            scene_id=index["scene_id"], shard_dir=index_path.parent, index_path=index_path,
            params_hash=index["params_hash"], reused=reused, tile_px=index["tile_px"],
            overlap_px=index["overlap_px"], tiles_total=stats["tiles_total"],
            tiles_written=stats["tiles_written"], positive_tiles=stats["positive_tiles"],
            background_tiles=stats["background_tiles"], skipped=dict(stats["skipped"]),
            objects_per_class=dict(stats["objects_per_class"]),
            boxes_written=stats["boxes_written"], partial_objects=stats["partial_objects"],
            notes=tuple(index["notes"]), rejected_features=tuple(index["rejected_features"]),
            elapsed_s=stats["elapsed_s"], megapixels_per_s=stats["megapixels_per_s"])



def tile_scene(scene_path: str | os.PathLike[str], labels_path: str | os.PathLike[str] | None,
               classes: Sequence[str], out_dir: str | os.PathLike[str],
               params: TilingConfig | None = None, *, aoi: str | os.PathLike[str] | None = None,
               scene_id: str | None = None,
               class_mapper: ClassMapper | None = None,
               class_property: str | None = None, workers: int | None = None,
               progress: bool = False, windows: Sequence[PixelWindow] | None = None,
               tile_extras: Sequence[Mapping[str, Any]] | None = None) -> TilingResult:
    """Tile one scene and its annotations into a YOLO shard (see the module docstring).

    Args:
        scene_path: Georeferenced raster (GeoTIFF).
        labels_path: GeoJSON annotations in any CRS, or None for a scene without objects.
        classes: Class names in model index order.
        out_dir: Root of the shards: ``<out_dir>/<params_hash>/<scene_id>``.
        params: Tiling parameters; defaults of :class:`TilingConfig` when None.
        aoi: GeoJSON of the area where annotations are complete; tiles outside it are skipped.
        scene_id: Defaults to the scene's file stem.
        class_mapper: Maps annotations' class spellings to ``classes`` (e.g. with the object
            type's aliases); default: case-insensitive match against ``classes``.
        class_property: Feature property holding the class; default the first present of
            ``class``, ``class_name``, ``label``, ``category``.
        workers: Worker processes; defaults to ``params.workers``.
        progress: Show a progress bar on stderr.
        windows: Write exactly these chips instead of the grid (hard-example mining): every
            window is written whatever it holds (nodata and AOI rules still apply), and the
            background ratio does not apply. Windows must be distinct.
        tile_extras: With ``windows``, one mapping per window merged into its tile record in
            ``index.json`` (e.g. the mining reason); keys must not clash with the tiler's.

    Returns:
        What was written (or found already written).

    Raises:
        InputError: the scene, annotations or AOI are unusable (message names file/feature).
        ConfigError: the parameters make no valid grid for this scene.
    """
    started = time.perf_counter()
    params = params or TilingConfig()
    classes = list(classes)
    if not classes:
        raise ConfigError("classes: give at least one class name")
    if len({c.strip().lower() for c in classes}) != len(classes):
        raise ConfigError(f"classes {classes}: names must be unique (case-insensitive)")
    mapper = class_mapper or ClassMapper(tuple(classes))
    scene_path = Path(scene_path)
    labels = Path(labels_path) if labels_path is not None else None
    aoi_path = Path(aoi) if aoi is not None else None
    n_workers = max(1, workers if workers is not None else params.workers)
    if tile_extras is not None and (windows is None or len(tile_extras) != len(windows)):
        raise ConfigError("tile_extras needs windows, one mapping per window")
    if windows is not None and len(set(windows)) != len(windows):
        raise ConfigError("windows must be distinct")

    with gdal_env():
        with open_raster(scene_path) as dataset:
            scene = scene_info(dataset, scene_path, scene_id)
            bands = select_bands(dataset, params.bands, str(scene_path))
        tile_px, overlap_px = resolve_tile_px(params, scene)
        objects = load_annotations(labels, scene, mapper, class_property)
        aoi_px = load_aoi(aoi_path, scene) if aoi_path is not None else None

        digest = params_hash(params, classes)
        group_dir = Path(out_dir) / digest
        shard_dir = group_dir / scene.scene_id
        source = {
            "scene": raster_fingerprint(scene_path),
            "labels_sha256": file_sha256(labels) if labels is not None else None,
            "aoi_sha256": file_sha256(aoi_path) if aoi_path is not None else None,
            "classes_sha256": hashlib.sha256(
                "\n".join(objects.resolved_classes).encode()).hexdigest(),
            "tile_px": tile_px, "overlap_px": overlap_px,
        }
        if windows is not None:
            source["windows_sha256"] = hashlib.sha256(json.dumps(
                [[list(w.bounds) for w in windows], list(tile_extras or [])],
                sort_keys=True, default=str).encode()).hexdigest()
        existing = _existing_shard(shard_dir, source)
        if existing is not None:
            return existing

        tmp_dir = group_dir / f".tmp-{scene.scene_id}-{uuid.uuid4().hex[:8]}"
        try:
            group_dir.mkdir(parents=True, exist_ok=True)
            _write_params(group_dir / "params.json", params, classes, digest)
            (tmp_dir / "images").mkdir(parents=True)
            (tmp_dir / "labels").mkdir()
            _build_shard(
                scene, dataset_bands=bands, params=params, classes=classes, objects=objects,
                aoi_px=aoi_px, tile_px=tile_px, overlap_px=overlap_px, tmp_dir=tmp_dir,
                workers=n_workers, progress=progress, digest=digest, source=source,
                started=started, windows=windows, tile_extras=tile_extras)
            _publish(tmp_dir, shard_dir)
        except StorageError:
            raise  # already names what failed (e.g. the scene's object on S3)
        except OSError as exc:
            raise StorageError(f"{group_dir}: cannot write the shard of scene "
                               f"{scene.scene_id} ({exc})") from None
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return TilingResult.from_index(shard_dir / "index.json", reused=False)


def _existing_shard(shard_dir: Path, source: Mapping[str, Any]) -> TilingResult | None:
    index_path = shard_dir / "index.json"
    try:
        recorded = json.loads(index_path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError):
        return None
    if recorded != source:
        return None
    return TilingResult.from_index(index_path, reused=True)


def _write_params(path: Path, params: TilingConfig, classes: Sequence[str], digest: str) -> None:
    if path.exists():
        return
    payload = {"params_hash": digest, "tiler_version": TILER_VERSION, "classes": list(classes),
               "params": params.model_dump(mode="json", exclude={"workers"})}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _publish(tmp_dir: Path, shard_dir: Path) -> None:
    """Move a finished shard into place; an older shard of the scene is replaced."""
    old = None
    if shard_dir.exists():
        old = shard_dir.with_name(f".old-{shard_dir.name}-{uuid.uuid4().hex[:8]}")
        os.replace(shard_dir, old)
    try:
        os.replace(tmp_dir, shard_dir)
    except OSError:
        # A concurrent run of the same scene published first; its shard is as good as ours.
        if not (shard_dir / "index.json").exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_shard(scene: SceneInfo, *, dataset_bands: tuple[int, ...], params: TilingConfig,
                 classes: Sequence[str], objects: Annotations, aoi_px: shapely.Geometry | None,
                 tile_px: int, overlap_px: int, tmp_dir: Path, workers: int, progress: bool,
                 digest: str, source: Mapping[str, Any], started: float,
                 windows: Sequence[PixelWindow] | None = None,
                 tile_extras: Sequence[Mapping[str, Any]] | None = None) -> None:
    chosen = windows is not None
    if windows is None:
        windows = tile_grid(scene.width, scene.height, tile_px, overlap_px)
    else:
        scene_box = PixelWindow(0, 0, scene.width, scene.height)
        for w in windows:
            if w.intersection(scene_box) != w:
                raise ConfigError(f"window {w} is not inside scene {scene.scene_id} "
                                  f"({scene.width} x {scene.height} px)")
    windows = list(windows)
    plan = plan_tiles(windows, scene.scene_id, objects, classes, aoi_px, params.min_visibility)
    with open_raster(scene.path) as dataset:
        stretch = scene_stretch(dataset, dataset_bands, params.stretch_percentiles)
    setup = WorkerSetup(str(scene.path), stretch, str(tmp_dir), params.image_format,
                        params.jpeg_quality, params.max_nodata_fraction)
    n = len(windows)
    status: list[str] = ["outside_aoi" if not plan.in_aoi[i] else "background_cap"
                         for i in range(n)]
    nodata: list[float | None] = [None] * n
    # Chosen windows (mining) are all written: a hard negative is an empty chip on purpose.
    positive = [i for i in range(n) if plan.in_aoi[i] and (chosen or plan.label_text[i])]
    background = background_order(
        np.array([] if chosen else
                 [i for i in range(n) if plan.in_aoi[i] and not plan.label_text[i]], int),
        params.seed, scene.scene_id)
    # One pass over positives and the background sample they allow, in grid order, so scene
    # blocks are decoded about once; then exact bookkeeping for tiles skipped for nodata.
    taken = min(len(background), round(params.background_ratio * len(positive)))
    first_pass = work_chunks(plan, [*positive, *background[:taken].tolist()])
    use = min(workers, max(1, len(first_pass)))
    total = len(positive) + taken
    with TileExecutor(setup, use) as executor, progress_bar(
            f"tiling {scene.scene_id}", total=total, enabled=progress) as bar:

        def record(results: list[TileOutcome]) -> None:
            for index, state, fraction in results:
                status[index] = state
                nodata[index] = round(fraction, 4)

        record(executor.run(first_pass, bar.advance))
        quota = round(params.background_ratio * sum(status[i] == "written" for i in positive))
        kept = [int(i) for i in background[:taken] if status[i] == "written"]
        for i in kept[quota:]:  # positives lost to nodata lowered the quota
            (tmp_dir / "images" / f"{plan.tile_ids[i]}.{setup.image_format}").unlink()
            (tmp_dir / "labels" / f"{plan.tile_ids[i]}.txt").unlink()
            status[i] = "background_cap"
        # Background chips skipped for nodata are replaced by the next ones in seeded order.
        while len(kept) < quota and taken < len(background):
            batch = background[taken:taken + quota - len(kept)].tolist()
            taken += len(batch)
            total += len(batch)
            results = executor.run(work_chunks(plan, batch),
                                   functools.partial(bar.advance, total=total))
            record(results)
            kept += [i for i, state, _ in results if state == "written"]
    written = [i for i in range(n) if status[i] == "written"]
    positive_written = [i for i in written if plan.label_text[i]]
    labelled = (np.unique(np.concatenate([plan.object_sets[i] for i in positive_written]))
                if positive_written else np.empty(0, int))
    per_class = {name: 0 for name in classes}
    for o in labelled:
        per_class[classes[objects.class_idx[o]]] += 1
    elapsed = time.perf_counter() - started
    ext = "jpg" if params.image_format == "jpg" else "png"
    skipped = {reason: sum(s == reason for s in status) for reason in SKIP_REASONS}
    tiles = []
    for i, win in enumerate(windows):
        is_written = status[i] == "written"
        tiles.append({
            "id": plan.tile_ids[i],
            "window": [win.col_off, win.row_off, win.width, win.height],
            "map_bounds": list(win.map_bounds(scene.transform)),
            "status": status[i],
            "is_background": not plan.label_text[i],
            "objects": plan.objects[i],
            "nodata_fraction": nodata[i],
            "partial_objects": plan.partial[i],
            "image": f"images/{plan.tile_ids[i]}.{ext}" if is_written else None,
            "label": f"labels/{plan.tile_ids[i]}.txt" if is_written else None,
        })
        if tile_extras is not None:
            clash = sorted(set(tile_extras[i]) & set(tiles[-1]))
            if clash:
                raise ConfigError(f"tile_extras keys {', '.join(clash)} clash with the tile "
                                  "index's own keys")
            tiles[-1].update(tile_extras[i])
    index = {
        "format_version": 1,
        "scene_id": scene.scene_id,
        "params_hash": digest,
        "classes": list(classes),
        "params": params.model_dump(mode="json", exclude={"workers"}),
        "source": dict(source),
        "scene": {"path": raster_uri(scene.path), "width": scene.width, "height": scene.height,
                  "crs": scene.crs.to_wkt(), "transform": list(scene.transform)[:6],
                  "gsd_m": scene.gsd_m, "dtype": scene.dtype, "count": scene.count},
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        "stretch": stretch.to_dict(),
        "notes": list(objects.notes),
        "rejected_features": list(objects.rejected),
        "stats": {
            "tiles_total": n,
            "tiles_written": len(written),
            "positive_tiles": len(positive_written),
            "background_tiles": len(written) - len(positive_written),
            "skipped": skipped,
            "objects_per_class": per_class,
            "boxes_written": sum(plan.label_text[i].count("\n") for i in written),
            "partial_objects": sum(len(plan.partial[i]) for i in written),
            "elapsed_s": round(elapsed, 3),
            "megapixels_per_s": round(scene.megapixels / elapsed, 2) if elapsed > 0 else 0.0,
        },
        "tiles": tiles,
    }
    # Written last: a shard without index.json is never taken as complete.
    (tmp_dir / "index.json").write_text(
        json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")

