"""Sliced inference over whole scenes, cross-tile merge, and georeferenced detections.

:func:`detect_scene` runs a YOLO detector over a scene of any size:

- **Tiles and radiometry** come from :mod:`retrain_lib.tiling` (:func:`tile_grid`,
  :func:`scene_stretch`, :func:`read_chip`), so the model sees exactly what it was trained on.
  Tiles are fed at native resolution (no resizing: the ground sample distance stays that of
  the training chips).
- **Reading overlaps compute.** Reader threads read runs of neighbouring tiles (one windowed
  read per run, GDAL releases the GIL) into a bounded queue while the model runs; memory
  depends on the batch and queue sizes, not on the scene size. Tiles without a valid pixel
  are skipped.
- **Batched forward passes** through Ultralytics' ``AutoBackend`` (fused, half precision on
  GPU) and Ultralytics' per-tile NMS.
- **Cross-tile merge.** Boxes touching a tile edge that lies inside the scene are cut-off
  fragments of objects that the neighbouring tile sees whole (any object smaller than the
  overlap is wholly inside some tile), so they are dropped first. Duplicates from the overlap
  are then merged by class-aware NMS (IoU) or, as an option, greedy non-maximum merging by
  intersection over the smaller box (IoS, SAHI's ``GREEDYNMM``). Both use a spatial index and
  handle 100,000+ boxes in about a second.

Model source: a weights file, or an MLflow model URI ``models:/<name>@<alias>`` or
``models:/<name>/<version>``. A registered version's source is its training run's artifact
root, and the weights are its ``weights/best.pt`` (the registry's convention).

Output: a GeoJSON FeatureCollection of box polygons in the scene CRS (with the legacy
``crs`` member, so QGIS places it), optionally a copy in EPSG:4326, or a GeoPackage. Each
feature carries ``class``, ``class_id``, ``score``, ``model``, ``model_version`` and
``scene_id``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrain_lib.config import TilingConfig
from retrain_lib.errors import ConfigError, InputError, StorageError

__all__ = [
    "DetectOptions",
    "DetectStats",
    "Detector",
    "MergeResult",
    "ModelRef",
    "SceneDetections",
    "detect_scene",
    "load_detector",
    "merge_detections",
    "resolve_model",
    "write_detections",
]

WEIGHTS_IN_MODEL = "weights/best.pt"
MergeMethod = Literal["nms", "nmm", "none"]
# A box whose edge lies within this many pixels of an inner tile edge counts as cut off.
EDGE_MARGIN_PX = 3
# Windows read in one go: neighbouring tiles of a row share their overlap.
MAX_RUN_TILES = 4
GDAL_CACHE_BYTES = 64 * 2**20  # rasterio takes an integer GDAL_CACHEMAX in bytes


# ----------------------------------------------------------------------------- merge


@dataclass(frozen=True, eq=False)
class MergeResult:
    """Boxes after a cross-tile merge.

    Attributes:
        boxes: ``(k, 4)`` merged boxes (``x_min, y_min, x_max, y_max``).
        scores: ``(k,)`` scores (the best of each merged group).
        classes: ``(k,)`` classes (that of the best box of each group).
        kept: ``(k,)`` index of each group's best box in the input.
        group: ``(n,)`` for every input box, the output row it went into.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    kept: np.ndarray
    group: np.ndarray


def merge_detections(boxes: Any, scores: Any, classes: Any, *, method: MergeMethod = "nms",
                     threshold: float = 0.5, class_aware: bool = True) -> MergeResult:
    """Merge duplicate detections of the same objects (e.g. from overlapping tiles).

    Greedy, by descending score (ties keep input order):

    - ``"nms"``: a box is dropped when a kept, higher-scored box of its class overlaps it
      with IoU > ``threshold``.
    - ``"nmm"``: each kept box absorbs every remaining box of its class whose intersection
      over the smaller of the two areas (IoS) > ``threshold``; the merged box is the envelope
      of the group, its score the group's best (SAHI's greedy NMM).
    - ``"none"``: keep everything.

    Candidate pairs come from a spatial index, so the cost follows the number of overlapping
    pairs rather than n²; 100,000 boxes take about a second.

    Raises:
        ValueError: bad shapes, an unknown method, or a threshold outside ``(0, 1]``.
    """
    from retrain_lib.evaluate import overlapping_pairs

    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(s) != n or len(c) != n:
        raise ValueError(f"merge_detections: {n} boxes but {len(s)} scores and {len(c)} classes")
    if method not in ("nms", "nmm", "none"):
        raise ValueError(f"merge method: got {method!r}; expected 'nms', 'nmm' or 'none'")
    if not 0 < threshold <= 1:
        raise ValueError(f"merge threshold: got {threshold}; expected a value in (0, 1]")
    order = np.argsort(-s, kind="stable")
    if method == "none" or n < 2:
        return MergeResult(b[order], s[order], c[order], order, _inverse(order))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)

    i, j = overlapping_pairs(b)
    if class_aware:
        same = c[i] == c[j]
        i, j = i[same], j[same]
    inter = ((np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]))
             * (np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1])))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # IoU for NMS; intersection over the smaller box for NMM (a fragment inside a whole box).
    denominator = (area[i] + area[j] - inter) if method == "nms" else np.minimum(area[i], area[j])
    with np.errstate(divide="ignore", invalid="ignore"):
        metric = np.where(denominator > 0, inter / denominator, 1.0)
    hit = metric > threshold
    i, j = i[hit], j[hit]
    # Orient each pair (higher-ranked, lower-ranked) and visit pairs by the higher one's rank:
    # when a pair is reached, the fate of its higher-ranked box is already final.
    swap = rank[i] > rank[j]
    hi = np.where(swap, j, i)
    lo = np.where(swap, i, j)
    visit = np.lexsort((rank[lo], rank[hi]))
    owner = np.full(n, -1, dtype=np.int64)  # -1: leads its own group
    for h, low in zip(hi[visit].tolist(), lo[visit].tolist(), strict=True):
        if owner[h] < 0 and owner[low] < 0:
            owner[low] = h
    leaders = order[owner[order] < 0]  # by descending score
    row_of_leader = np.full(n, -1, dtype=np.int64)
    row_of_leader[leaders] = np.arange(len(leaders))
    group = np.where(owner < 0, row_of_leader, row_of_leader[np.maximum(owner, 0)])
    merged = b[leaders].copy()
    if method == "nmm":
        np.minimum.at(merged[:, 0], group, b[:, 0])
        np.minimum.at(merged[:, 1], group, b[:, 1])
        np.maximum.at(merged[:, 2], group, b[:, 2])
        np.maximum.at(merged[:, 3], group, b[:, 3])
    return MergeResult(merged, s[leaders], c[leaders], leaders, group)


def _inverse(order: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse


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


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelRef:
    """A model's weights on local disk and the identity written into every detection.

    Attributes:
        weights: Local weights file.
        name: Registered model name; for a file, its run folder (``<run>/weights/best.pt``)
            or its stem.
        version: Registered version, or ``sha256:<12 hex>`` of the weights file.
        source: What the caller gave (path or URI).
    """

    weights: Path
    name: str
    version: str
    source: str


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:12]}"


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, alias, version)."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"model URI {uri!r}: expected models:/<name>@<alias> (e.g. "
                      "models:/autoretrain-vehicle@champion) or models:/<name>/<version>")


def resolve_model(source: str | os.PathLike[str], *, tracking_uri: str | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> ModelRef:
    """Find a model's weights: a local file, or an MLflow registered model version.

    A ``models:/`` URI is resolved with the MLflow client (``tracking_uri``, default
    ``MLFLOW_TRACKING_URI`` or the project's default database); the version's
    ``weights/best.pt`` is downloaded once into
    ``cache_dir/<name>/<version>-<hash of the version's source>/``.

    Raises:
        ConfigError: a malformed URI, or a file that is not a weights file.
        InputError: the file, model, alias or version does not exist, or the version has no
            ``weights/best.pt``.
    """
    text = os.fspath(source)
    if not text.startswith("models:/"):
        path = Path(text)
        if not path.is_file():
            raise InputError(f"{path}: model weights file not found")
        if path.suffix not in (".pt", ".onnx", ".engine", ".torchscript"):
            raise ConfigError(f"{path}: expected YOLO weights (.pt, .onnx, .engine, "
                              ".torchscript) or an MLflow URI models:/<name>@<alias>")
        # Ultralytics writes <run>/weights/best.pt: the run's folder names the model better.
        name = (path.parent.parent.name if path.parent.name == "weights"
                and path.parent.parent.name else path.stem)
        return ModelRef(weights=path, name=name, version=_file_digest(path), source=text)

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_models_uri(text)
    if tracking_uri is None:
        from retrain_lib.registry import default_tracking_uri

        tracking_uri = default_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias is not None
              else client.get_model_version(name, str(version)))
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise InputError(f"{text}: registered model {name!r} has no {what} in {tracking_uri} "
                         f"({exc.message if hasattr(exc, 'message') else exc})") from None
    root = Path(cache_dir) if cache_dir is not None else (
        Path(tempfile.gettempdir()) / "autoretrain-models")
    # Version numbers restart in every tracking server (each test, each demo): key the cache
    # by the version's source too, or another server's v1 would be served as this one's.
    source_tag = hashlib.sha256(str(mv.source).encode()).hexdigest()[:12]
    target = root / _safe_name(name) / f"{mv.version}-{source_tag}"
    weights = target / WEIGHTS_IN_MODEL
    if not weights.is_file():
        import mlflow.artifacts

        artifact_uri = f"{str(mv.source).rstrip('/')}/{WEIGHTS_IN_MODEL}"
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_mkdir(root)))
        try:
            fetched = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=tracking_uri))
            weights.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, weights)  # appears complete or not at all
        except (MlflowException, OSError) as exc:
            raise InputError(f"{text}: version {mv.version} has no {WEIGHTS_IN_MODEL} under "
                             f"{mv.source} ({exc})") from None
        finally:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return ModelRef(weights=weights, name=name, version=str(mv.version), source=text)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


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
    if device != "cpu":
        if not device.isdigit():
            raise ConfigError(f"device: got {device!r}; expected 'cpu' or a CUDA index like '0'")
        if not torch.cuda.is_available() or int(device) >= torch.cuda.device_count():
            raise ConfigError(f"device: got {device!r}, but no such CUDA device is available; "
                              "use --device cpu")
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
    scene: Any  # retrain_lib.tiling.SceneInfo
    model: ModelRef
    stats: DetectStats

    def polygons(self) -> np.ndarray:
        """Boxes as polygons in the scene CRS (parallelograms when the scene is rotated)."""
        import shapely

        from retrain_lib.geo import pixel_to_map

        b = self.boxes
        return np.asarray(pixel_to_map(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]),
                                       self.scene.transform), dtype=object)

    def to_eval_input(self, truth_path: str | os.PathLike[str]) -> Any:
        """These detections and a truth GeoJSON (any CRS) as one scene for evaluation.

        Returns:
            A :class:`retrain_lib.evaluate.SceneEvalInput` in this scene's pixels, classes
            indexing ``class_names``; score many with
            ``evaluate_scenes(inputs, detector.class_names)``.

        Raises:
            InputError: the truth file is unreadable or has a class the model does not know.
        """
        from retrain_lib.evaluate import SceneEvalInput, read_scene_boxes

        truth = read_scene_boxes(truth_path, crs=self.scene.crs, transform=self.scene.transform)
        lookup = {name.lower(): k for k, name in enumerate(self.class_names)}
        classes = np.empty(len(truth.class_names), dtype=np.int64)
        for i, name in enumerate(truth.class_names):
            k = lookup.get(name.lower())
            if k is None:
                raise InputError(f"{truth.source}: feature {int(truth.feature_index[i])} has "
                                 f"class {name!r}, which the model {self.model.name} does not "
                                 f"know; expected one of {', '.join(self.class_names)}")
            classes[i] = k
        return SceneEvalInput(self.scene.scene_id, self.boxes, self.classes, self.scores,
                              truth.boxes, classes)

    def properties(self) -> list[dict[str, Any]]:
        """Per detection: class, class_id, score, model, model_version, scene_id."""
        names = self.class_names
        return [{"class": names[k], "class_id": k, "score": round(s, 5),
                 "model": self.model.name, "model_version": self.model.version,
                 "scene_id": self.scene.scene_id}
                for k, s in zip(self.classes.tolist(), self.scores.tolist(), strict=True)]


@dataclass(frozen=True)
class _TileBatch:
    windows: list[Any]
    pixels: np.ndarray  # (b, h, w, 3) uint8
    consumed: int  # grid tiles accounted for since the previous batch, skipped ones included
    skipped: int  # of which skipped for nodata


def _runs(windows: Sequence[Any]) -> list[list[int]]:
    """Group row-neighbouring tiles (grid order) into runs read with one window each."""
    runs: list[list[int]] = []
    for i, win in enumerate(windows):
        if runs:
            prev = windows[runs[-1][-1]]
            if (len(runs[-1]) < MAX_RUN_TILES and win.row_off == prev.row_off
                    and win.col_off <= prev.col_off + prev.width):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


class _RunReader:
    """Reads tile runs in worker threads, one rasterio dataset per thread (GDAL handles must
    not be shared between threads); closed from the caller's thread once reading is over."""

    def __init__(self, path: Path, stretch: Any, windows: Sequence[Any],
                 pad_hw: tuple[int, int]) -> None:
        self.path = path
        self.stretch = stretch
        self.windows = windows
        self.pad_hw = pad_hw
        self.local = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def _dataset(self) -> Any:
        dataset = getattr(self.local, "dataset", None)
        if dataset is None:
            import rasterio

            dataset = rasterio.open(self.path)
            self.local.dataset = dataset
            with self.lock:
                self.opened.append(dataset)
        return dataset

    def read(self, run: list[int]) -> list[tuple[Any, np.ndarray | None]]:
        """The run's tiles, padded to the batch shape; None for a tile with no valid pixel."""
        from retrain_lib.geo import PixelWindow
        from retrain_lib.tiling import read_chip

        first, last = self.windows[run[0]], self.windows[run[-1]]
        union = PixelWindow.from_bounds(first.col_off, first.row_off,
                                        last.col_off + last.width, first.row_off + first.height)
        chip = read_chip(self._dataset(), union, self.stretch)
        out: list[tuple[Any, np.ndarray | None]] = []
        for i in run:
            win = self.windows[i]
            rows, cols = win.relative_to(union).slices
            # Skip only tiles without a valid pixel: a partly valid tile can still hold objects.
            if chip.valid is not None and not chip.valid[rows, cols].any():
                out.append((win, None))
                continue
            pixels = chip.rgb[rows, cols]
            h, w = self.pad_hw
            if pixels.shape[:2] != (h, w):
                # Ultralytics' letterbox grey; boxes keep their top-left origin.
                padded = np.full((h, w, 3), 114, dtype=np.uint8)
                padded[: pixels.shape[0], : pixels.shape[1]] = pixels
                pixels = padded
            out.append((win, pixels))
        return out

    def close(self) -> None:
        with self.lock:
            for dataset in self.opened:
                dataset.close()
            self.opened.clear()


class _InlineExecutor:
    """``readers=0``: read each run in the caller's thread when it is submitted."""

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # re-raised by future.result() in order, like a pool
            future.set_exception(exc)
        return future


def _batches(reader: _RunReader, runs: list[list[int]], batch: int, readers: int,
             prefetch_batches: int) -> Iterator[_TileBatch]:
    """Yield batches in grid order while reader threads keep up to ``prefetch_batches``
    batches of tiles read ahead (bounded, so memory does not grow with the scene)."""
    in_flight = max(readers, prefetch_batches * batch // MAX_RUN_TILES)
    pending: queue.SimpleQueue[Future[list[tuple[Any, np.ndarray | None]]]] = (
        queue.SimpleQueue())
    executor = (ThreadPoolExecutor(max_workers=readers, thread_name_prefix="tile-reader")
                if readers else _InlineExecutor())
    with executor as pool:
        run_iter = iter(runs)
        n_pending = 0
        for run in run_iter:
            pending.put(pool.submit(reader.read, run))
            n_pending += 1
            if n_pending >= in_flight:
                break
        windows: list[Any] = []
        pixels: list[np.ndarray] = []
        consumed = skipped = 0
        try:
            while n_pending:
                future = pending.get()
                n_pending -= 1
                nxt = next(run_iter, None)
                if nxt is not None:
                    pending.put(pool.submit(reader.read, nxt))
                    n_pending += 1
                for win, px in future.result():
                    consumed += 1
                    if px is None:
                        skipped += 1
                        continue
                    windows.append(win)
                    pixels.append(px)
                    if len(windows) == batch:
                        yield _TileBatch(windows, np.stack(pixels), consumed, skipped)
                        windows, pixels, consumed, skipped = [], [], 0, 0
            if windows or consumed:
                stacked = np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8)
                yield _TileBatch(windows, stacked, consumed, skipped)
        finally:
            while n_pending:
                pending.get().cancel()
                n_pending -= 1


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
    import rasterio

    from retrain_lib.tiling import inspect_scene, resolve_tile_px, scene_stretch, tile_grid

    options = options or DetectOptions()
    started = time.perf_counter()
    scene = inspect_scene(scene_path, scene_id)
    tile_px, overlap_px = resolve_tile_px(options.tiling, scene)
    windows = tile_grid(scene.width, scene.height, tile_px, overlap_px)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(scene.path) as dataset:
        stretch = scene_stretch(dataset, options.tiling.bands,
                                options.tiling.stretch_percentiles)
    stride = detector.stride
    pad_hw = (math.ceil(windows[0].height / stride) * stride,
              math.ceil(windows[0].width / stride) * stride)
    reader = _RunReader(scene.path, stretch, windows, pad_hw)

    parts: list[np.ndarray] = []
    memory = _MemoryGuard()
    done = skipped = n_cut = n_raw = 0
    model_s = wait_s = 0.0
    if on_progress is not None:
        on_progress(0, len(windows))
    # GDAL's block cache is process-wide and defaults to 5 % of RAM; a small one keeps memory
    # flat in the scene size (each block is read about once anyway).
    gdal_env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)
    gdal_env.__enter__()
    try:
        t_wait = time.perf_counter()
        for tile_batch in _batches(reader, _runs(windows), options.batch, options.readers,
                                   options.prefetch_batches):
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
        gdal_env.__exit__(None, None, None)
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


class _MemoryGuard:
    """Keeps RSS flat in the number of tiles.

    Tiles are allocated by reader threads and freed by the model's thread; with several
    threads, glibc's per-thread heaps keep freed pages, and RSS creeps up with the number of
    tiles (measured: 5120 px scene, 2 torch threads: +370 MiB). When RSS has grown by more
    than ``slack_mib`` since the first batch, freed pages are handed back to the OS
    (``malloc_trim``, glibc only). Not after every batch: the next forward pass would fault
    its activation pages in again, which costs more than it saves.
    """

    def __init__(self, slack_mib: int = 64) -> None:
        import psutil

        self.process = psutil.Process()
        self.slack = slack_mib * 2**20
        self.reference: int | None = None
        self.trims = 0

    def check(self) -> None:
        rss = self.process.memory_info().rss
        if self.reference is None:
            self.reference = rss
        elif rss > self.reference + self.slack:
            trim = _malloc_trim()
            if trim is not None:
                trim(0)
                self.trims += 1


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


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
    from retrain_lib.geo import WGS84, reproject_geometries

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
    from retrain_lib.geo import Feature, write_geojson

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

    from retrain_lib.geo import to_crs

    columns = ("class", "class_id", "score", "model", "model_version", "scene_id")
    field_data = [
        np.array([p["class"] for p in properties], dtype=object),
        np.array([p["class_id"] for p in properties], dtype=np.int32),
        np.array([p["score"] for p in properties], dtype=np.float64),
        np.array([p["model"] for p in properties], dtype=object),
        np.array([p["model_version"] for p in properties], dtype=object),
        np.array([p["scene_id"] for p in properties], dtype=object),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.gpkg")
    partial.unlink(missing_ok=True)
    write(str(partial), shapely.to_wkb(geoms) if len(geoms) else np.zeros(0, dtype=object),
          field_data, list(columns), layer="detections", driver="GPKG",
          geometry_type="Polygon", crs=to_crs(crs).to_wkt())
    os.replace(partial, path)
