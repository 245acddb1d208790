"""Sliced inference over whole scenes, cross-tile merge, and georeferenced detections.

:func:`detect_scene` runs a YOLO detector over a scene of any size:

- **Tiles and radiometry** come from :mod:`retrain_lib.geo` (the tile grid, the scene's
  stretch and the windowed reader), so the model sees exactly what it was trained on. Tiles
  are fed at native resolution (no resizing: the ground sample distance stays that of
  the training chips).
- **Reading overlaps compute** (:mod:`retrain_lib.stages.inference_reader`): reader threads
  read runs of neighbouring tiles into a bounded queue while the model runs; memory depends on
  the batch and queue sizes, not on the scene size. Tiles without a valid pixel are skipped.
- **Batched forward passes** through Ultralytics' ``AutoBackend`` (fused, half precision on
  GPU) and Ultralytics' per-tile NMS.
- **Cross-tile merge.** Boxes touching a tile edge that lies inside the scene are cut-off
  fragments of objects that the neighbouring tile sees whole (any object smaller than the
  overlap is wholly inside some tile), so they are dropped first. Duplicates from the overlap
  are then merged by :func:`retrain_lib.geo.boxes.merge_detections`.

Model source: anything :func:`retrain_lib.stages.weights.resolve_model` resolves: a weights
file, a storage URI of one, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.

Output: a GeoJSON FeatureCollection of box polygons in the scene CRS (with the legacy
``crs`` member, so QGIS places it), optionally a copy in EPSG:4326, or a GeoPackage. Each
feature carries ``class``, ``class_id``, ``score``, ``model``, ``model_version`` and
``scene_id``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrain_lib.core.config import TilingConfig
from retrain_lib.core.device import check_device_available, parse_device
from retrain_lib.core.errors import ConfigError, InputError, StorageError
from retrain_lib.geo.boxes import MergeMethod, merge_detections
from retrain_lib.geo.raster import (
    SceneInfo,
    gdal_env,
    inspect_scene,
    open_raster,
    resolve_tile_px,
    scene_stretch,
)
from retrain_lib.geo.windows import tile_grid
from retrain_lib.stages.inference_reader import MemoryGuard, RunReader, tile_batches, tile_runs
from retrain_lib.stages.weights import ModelRef, resolve_model

__all__ = [
    "DetectOptions",
    "DetectStats",
    "Detector",
    "SceneDetections",
    "detect_scene",
    "load_detector",
    "write_detections",
]

# A box whose edge lies within this many pixels of an inner tile edge counts as cut off.
EDGE_MARGIN_PX = 3


def _cut_off(boxes: np.ndarray, tile: Any, scene_w: int, scene_h: int,
             overlap_px: int) -> np.ndarray:
    """Boxes (tile pixels) that touch an inner tile edge and fit in the neighbour's overlap."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    fits_x = (x1 - x0) < overlap_px - EDGE_MARGIN_PX
    fits_y = (y1 - y0) < overlap_px - EDGE_MARGIN_PX
    cut = np.zeros(len(boxes), dtype=bool)
    if tile.col_off > 0:
        cut |= (x0 <= EDGE_MARGIN_PX) & fits_x
    if tile.col_off + tile.width < scene_w:
        cut |= (x1 >= tile.width - EDGE_MARGIN_PX) & fits_x
    if tile.row_off > 0:
        cut |= (y0 <= EDGE_MARGIN_PX) & fits_y
    if tile.row_off + tile.height < scene_h:
        cut |= (y1 >= tile.height - EDGE_MARGIN_PX) & fits_y
    return cut



class Detector:
    """A loaded YOLO detector that maps batches of RGB tiles to boxes.

    Build it with :func:`load_detector`. ``predict`` is the whole per-batch model work
    (upload, forward, Ultralytics NMS), which the benchmark's forward-pass floor reuses.
    """

    def __init__(self, backend: Any, ref: ModelRef, device: Any, *, max_det: int) -> None:
        self.backend = backend
        self.ref = ref
        self.device = device
        self.max_det = max_det
        names = backend.names
        self.class_names: tuple[str, ...] = tuple(
            str(names[k]) for k in sorted(names)) if isinstance(names, dict) else tuple(names)
        self.stride = int(max(getattr(backend, "stride", 32), 32))
        self.half = bool(getattr(backend, "fp16", False))

    def predict(self, tiles: np.ndarray, *, conf: float, iou: float) -> list[np.ndarray]:
        """Detect objects in a batch of tiles.

        Args:
            tiles: ``(b, h, w, 3)`` uint8 RGB; ``h`` and ``w`` multiples of ``stride``.
            conf: Confidence threshold.
            iou: IoU of Ultralytics' per-tile NMS.

        Returns:
            Per tile, an ``(n, 6)`` float32 array ``x_min, y_min, x_max, y_max, score, class``
            in tile pixels.
        """
        import torch
        from ultralytics.utils import nms

        with torch.inference_mode():
            x = torch.from_numpy(tiles).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2)
            x = (x.half() if self.half else x.float()).div_(255)
            preds = self.backend(x)
            out = nms.non_max_suppression(
                preds, conf, iou, max_det=self.max_det, max_time_img=1.0,
                end2end=bool(getattr(self.backend, "end2end", False)))
        return [o[:, :6].float().cpu().numpy() for o in out]


def load_detector(model: str | os.PathLike[str] | ModelRef, *, device: str | None = None,
                  half: bool = True, threads: int | None = None, max_det: int = 1000,
                  tracking_uri: str | None = None) -> Detector:
    """Load a detector for inference (fused; half precision on GPU when ``half``).

    Args:
        model: Weights path, ``models:/`` URI, or a resolved :class:`ModelRef`.
        device: ``"cpu"``, a CUDA index such as ``"0"``, or None for the first GPU if any.
        half: Use FP16 on GPU (ignored on CPU).
        threads: Torch CPU threads; default all cores (Ultralytics lowers it on import).
        max_det: Most detections kept per tile.
        tracking_uri: MLflow tracking URI for ``models:/`` URIs.

    Raises:
        ConfigError: a bad device, or a model that is not a detector.
        InputError: the weights cannot be found or loaded.
    """
    ref = model if isinstance(model, ModelRef) else resolve_model(model,
                                                                 tracking_uri=tracking_uri)
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    torch.set_num_threads(threads or os.cpu_count() or 1)
    if device is None:
        device = "0" if torch.cuda.is_available() else "cpu"
    try:
        device = parse_device(device, several=False)
    except ValueError as exc:
        raise ConfigError(f"device: got {device!r}; {exc}") from None
    check_device_available(device)
    torch_device = torch.device("cpu" if device == "cpu" else f"cuda:{device}")
    try:
        backend = AutoBackend(str(ref.weights), device=torch_device, fp16=half, fuse=True,
                              verbose=False)
    except Exception as exc:  # Ultralytics raises many kinds for unreadable weights
        raise InputError(f"{ref.weights}: cannot load the model weights ({type(exc).__name__}:"
                         f" {exc})") from None
    backend.eval()
    task = getattr(getattr(backend, "model", None), "task", "detect")
    if task not in ("detect", None):
        raise ConfigError(f"{ref.source}: the model is a {task!r} model; expected 'detect'")
    return Detector(backend, ref, torch_device, max_det=max_det)


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class DetectOptions:
    """How a scene is sliced and how detections are merged.

    Attributes:
        tiling: Tile size, overlap, bands and stretch, as for training chips (the tiler's
            config; ``max_nodata_fraction`` and the chip options do not apply here).
        conf: Lowest score kept (use ~0.001 when the output feeds COCO mAP).
        iou: IoU of Ultralytics' NMS inside each tile.
        batch: Tiles per forward pass.
        merge: Cross-tile merge: ``"nms"``, ``"nmm"`` or ``"none"``.
        merge_threshold: IoU (nms) or IoS (nmm) above which boxes are merged.
        drop_cut_off: Drop boxes cut by an inner tile edge (see the module docstring).
        readers: Reader threads; 0 reads in the calling thread (no overlap with compute,
            but no thread competing for the GIL or a core).
        prefetch_batches: Batches read ahead of the model.
    """

    tiling: TilingConfig = field(default_factory=TilingConfig)
    conf: float = 0.25
    iou: float = 0.7
    batch: int = 16
    merge: MergeMethod = "nms"
    merge_threshold: float = 0.5
    drop_cut_off: bool = True
    readers: int = 1
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.conf <= 1:
            raise ConfigError(f"conf: got {self.conf}; expected a value in [0, 1]")
        if not 0 < self.iou <= 1 or not 0 < self.merge_threshold <= 1:
            raise ConfigError(f"iou/merge_threshold: got {self.iou}/{self.merge_threshold}; "
                              "expected values in (0, 1]")
        if not 1 <= self.batch <= 1024:
            raise ConfigError(f"batch: got {self.batch}; expected 1..1024 tiles")
        if self.merge not in ("nms", "nmm", "none"):
            raise ConfigError(f"merge: got {self.merge!r}; expected 'nms', 'nmm' or 'none'")
        if not 0 <= self.readers <= 32 or not 1 <= self.prefetch_batches <= 64:
            raise ConfigError("readers must be 0..32 and prefetch_batches 1..64")


@dataclass(frozen=True)
class DetectStats:
    """What a detection run did and where its time went (seconds)."""

    tiles_total: int
    tiles_skipped_nodata: int
    boxes_raw: int
    boxes_cut_off: int
    boxes_out: int
    tile_px: int
    overlap_px: int
    seconds_total: float
    seconds_model: float
    seconds_waiting_for_tiles: float
    seconds_merge: float


@dataclass(frozen=True, eq=False)
class SceneDetections:
    """Detections of one model on one scene, in scene pixels.

    Attributes:
        boxes: ``(n, 4)`` ``x_min, y_min, x_max, y_max`` in scene pixels.
        scores: ``(n,)`` confidences, descending.
        classes: ``(n,)`` class indexes into ``class_names``.
        class_names: The model's classes.
        scene: The scene (CRS, transform, id).
        model: The model's identity.
        stats: Counters and timings.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    scene: SceneInfo
    model: ModelRef
    stats: DetectStats

    def polygons(self) -> np.ndarray:
        """Boxes as polygons in the scene CRS (parallelograms when the scene is rotated)."""
        import shapely

        from retrain_lib.geo.crs import pixel_to_map

        b = self.boxes
        return np.asarray(pixel_to_map(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]),
                                       self.scene.transform), dtype=object)

    def to_eval_input(self, truth_path: str | os.PathLike[str]) -> Any:
        """These detections and a truth GeoJSON (any CRS) as one scene for evaluation.

        Returns:
            A :class:`retrain_lib.stages.evaluate.SceneEvalInput` in this scene's pixels, classes
            indexing ``class_names``; score many with
            ``evaluate_scenes(inputs, detector.class_names)``.

        Raises:
            InputError: the truth file is unreadable or has a class the model does not know.
        """
        from retrain_lib.core.classes import ClassMapper
        from retrain_lib.geo.annotations import read_scene_boxes
        from retrain_lib.stages.evaluate import SceneEvalInput

        truth = read_scene_boxes(truth_path, crs=self.scene.crs, transform=self.scene.transform)
        classes = ClassMapper(self.class_names).indexes(
            truth.class_names, source=truth.source, what=f"the model {self.model.name}",
            feature_index=truth.feature_index)
        return SceneEvalInput(self.scene.scene_id, self.boxes, self.classes, self.scores,
                              truth.boxes, classes)

    def properties(self) -> list[dict[str, Any]]:
        """Per detection: class, class_id, score, model, model_version, scene_id."""
        names = self.class_names
        return [{"class": names[k], "class_id": k, "score": round(s, 5),
                 "model": self.model.name, "model_version": self.model.version,
                 "scene_id": self.scene.scene_id}
                for k, s in zip(self.classes.tolist(), self.scores.tolist(), strict=True)]



def detect_scene(scene_path: str | os.PathLike[str], detector: Detector,
                 options: DetectOptions | None = None, *, scene_id: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> SceneDetections:
    """Detect objects over a whole scene (see the module docstring).

    Args:
        scene_path: Georeferenced raster.
        detector: From :func:`load_detector`.
        options: Slicing, thresholds and merge; defaults of :class:`DetectOptions`.
        scene_id: Written into every detection; default the file stem.
        on_progress: Called as ``on_progress(tiles_done, tiles_total)`` after each batch.

    Raises:
        InputError: the scene is missing, unreadable, or has no CRS.
        ConfigError: tiling parameters that make no grid for this scene.
    """
    options = options or DetectOptions()
    started = time.perf_counter()
    scene = inspect_scene(scene_path, scene_id)
    tile_px, overlap_px = resolve_tile_px(options.tiling, scene)
    windows = tile_grid(scene.width, scene.height, tile_px, overlap_px)
    with gdal_env(), open_raster(scene.path) as dataset:
        stretch = scene_stretch(dataset, options.tiling.bands,
                                options.tiling.stretch_percentiles)
    stride = detector.stride
    pad_hw = (math.ceil(windows[0].height / stride) * stride,
              math.ceil(windows[0].width / stride) * stride)
    reader = RunReader(scene.path, stretch, windows, pad_hw)

    parts: list[np.ndarray] = []
    memory = MemoryGuard()
    done = skipped = n_cut = n_raw = 0
    model_s = wait_s = 0.0
    if on_progress is not None:
        on_progress(0, len(windows))
    # GDAL's block cache is process-wide and defaults to 5 % of RAM; a small one keeps memory
    # flat in the scene size (each block is read about once anyway).
    with gdal_env():
        try:
            t_wait = time.perf_counter()
            for tile_batch in tile_batches(reader, tile_runs(windows), options.batch,
                                           options.readers, options.prefetch_batches):
                wait_s += time.perf_counter() - t_wait
                if tile_batch.windows:
                    t0 = time.perf_counter()
                    results = detector.predict(tile_batch.pixels, conf=options.conf,
                                               iou=options.iou)
                    model_s += time.perf_counter() - t0
                else:
                    results = []
                for win, det in zip(tile_batch.windows, results, strict=True):
                    n_raw += len(det)
                    if not len(det):
                        continue
                    det[:, [0, 2]] = det[:, [0, 2]].clip(0, win.width)
                    det[:, [1, 3]] = det[:, [1, 3]].clip(0, win.height)
                    if options.drop_cut_off:
                        cut = _cut_off(det, win, scene.width, scene.height, overlap_px)
                        n_cut += int(cut.sum())
                        det = det[~cut]
                    det = det.astype(np.float64)
                    det[:, [0, 2]] += win.col_off
                    det[:, [1, 3]] += win.row_off
                    parts.append(det)
                done += tile_batch.consumed
                skipped += tile_batch.skipped
                memory.check()
                if on_progress is not None:
                    on_progress(done, len(windows))
                t_wait = time.perf_counter()
        finally:
            reader.close()
    raw = np.concatenate(parts) if parts else np.zeros((0, 6))
    t0 = time.perf_counter()
    merged = merge_detections(raw[:, :4], raw[:, 4], raw[:, 5].astype(np.int64),
                              method=options.merge, threshold=options.merge_threshold)
    merge_s = time.perf_counter() - t0
    stats = DetectStats(
        tiles_total=len(windows), tiles_skipped_nodata=skipped, boxes_raw=n_raw,
        boxes_cut_off=n_cut, boxes_out=len(merged.boxes), tile_px=tile_px,
        overlap_px=overlap_px, seconds_total=round(time.perf_counter() - started, 3),
        seconds_model=round(model_s, 3), seconds_waiting_for_tiles=round(wait_s, 3),
        seconds_merge=round(merge_s, 3))
    return SceneDetections(boxes=merged.boxes, scores=merged.scores, classes=merged.classes,
                           class_names=detector.class_names, scene=scene, model=detector.ref,
                           stats=stats)



# ----------------------------------------------------------------------------- output


def write_detections(detections: SceneDetections, path: str | os.PathLike[str], *,
                     wgs84_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write detections as GeoJSON (``.geojson``/``.json``) or GeoPackage (``.gpkg``).

    GeoJSON is in the scene CRS with a legacy ``crs`` member (QGIS places it correctly);
    ``wgs84_path`` adds an RFC 7946 copy in EPSG:4326 longitude/latitude. GeoPackage output
    (layer ``detections``, scene CRS) needs pyogrio.

    Returns:
        The files written.

    Raises:
        ConfigError: an unknown file suffix, or GeoPackage without pyogrio.
        StorageError: a file cannot be written.
    """
    from retrain_lib.geo.crs import WGS84, reproject_geometries

    polygons = detections.polygons()
    properties = detections.properties()
    crs = detections.scene.crs
    written: list[Path] = []
    targets: list[tuple[Path, Any, np.ndarray]] = [(Path(path), crs, polygons)]
    if wgs84_path is not None:
        lonlat = (reproject_geometries(polygons, crs, WGS84) if len(polygons) else polygons)
        targets.append((Path(wgs84_path), WGS84, lonlat))
    for target, target_crs, geoms in targets:
        suffix = target.suffix.lower()
        try:
            if suffix in (".geojson", ".json"):
                _write_geojson(target, geoms, properties, target_crs)
            elif suffix == ".gpkg":
                _write_gpkg(target, geoms, properties, target_crs)
            else:
                raise ConfigError(f"{target}: unknown output format {suffix!r}; use .geojson "
                                  "or .gpkg")
        except OSError as exc:
            raise StorageError(f"{target}: cannot write detections ({exc})") from None
        written.append(target)
    return written


def _write_geojson(path: Path, geoms: np.ndarray, properties: list[dict[str, Any]],
                   crs: Any) -> None:
    from retrain_lib.geo.geojson import Feature, write_geojson

    write_geojson(path, (Feature(geometry=g, properties=p, index=i)
                         for i, (g, p) in enumerate(zip(geoms, properties, strict=True))), crs)


def _write_gpkg(path: Path, geoms: np.ndarray, properties: list[dict[str, Any]],
                crs: Any) -> None:
    try:
        from pyogrio.raw import write
    except ImportError:
        raise ConfigError(f"{path}: GeoPackage output needs the pyogrio package "
                          "(pip install pyogrio); or write .geojson") from None
    import shapely

    from retrain_lib.core.io import atomic_path
    from retrain_lib.geo.crs import to_crs

    columns = ("class", "class_id", "score", "model", "model_version", "scene_id")
    field_data = [
        np.array([p["class"] for p in properties], dtype=object),
        np.array([p["class_id"] for p in properties], dtype=np.int32),
        np.array([p["score"] for p in properties], dtype=np.float64),
        np.array([p["model"] for p in properties], dtype=object),
        np.array([p["model_version"] for p in properties], dtype=object),
        np.array([p["scene_id"] for p in properties], dtype=object),
    ]
    with atomic_path(path, keep_suffix=True) as partial:
        write(str(partial), shapely.to_wkb(geoms) if len(geoms) else np.zeros(0, dtype=object),
              field_data, list(columns), layer="detections", driver="GPKG",
              geometry_type="Polygon", crs=to_crs(crs).to_wkt())

