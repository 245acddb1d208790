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

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.features import geometry_mask

from retrain_lib.config import TilingConfig
from retrain_lib.errors import ConfigError, InputError, StorageError
from retrain_lib.geo import (
    Feature,
    PixelWindow,
    map_to_pixel,
    read_geojson,
    repair_polygons,
    reproject_geometries,
    scene_gsd_m,
    to_crs,
)

__all__ = [
    "SKIP_REASONS",
    "Annotations",
    "Chip",
    "SceneInfo",
    "Stretch",
    "TilingResult",
    "inspect_scene",
    "load_annotations",
    "params_hash",
    "read_chip",
    "resolve_tile_px",
    "scene_stretch",
    "tile_grid",
    "tile_scene",
]

# Bump when the chips or labels written for the same parameters change.
TILER_VERSION = 1
SKIP_REASONS = ("nodata", "outside_aoi", "background_cap")
CLASS_PROPERTIES = ("class", "class_name", "label", "category")
# GDAL's block cache defaults to 5% of RAM per process. A fixed cache keeps RSS flat and still
# holds the blocks under the vertical overlap of consecutive tile rows (see _chunks). rasterio
# passes an integer GDAL_CACHEMAX to GDALSetCacheMax64, i.e. in bytes, not MB.
GDAL_CACHE_BYTES = 64 * 2**20
MAX_RUN_TILES = 8  # tiles per horizontal read ...
CHUNK_TILE_ROWS = 4  # ... and grid rows per work unit (see _chunks)
STRETCH_SAMPLE_WINDOWS = 8  # per side: 64 windows ...
STRETCH_SAMPLE_PX = 128  # ... of 128 x 128 pixels when the scene has no overviews
_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --------------------------------------------------------------------------- scene access


@dataclass(frozen=True)
class SceneInfo:
    """What tiling and inference need to know about a scene, checked on open."""

    path: Path
    scene_id: str
    width: int
    height: int
    count: int
    dtype: str
    crs: pyproj.CRS
    transform: Affine
    gsd_m: float | None

    @property
    def megapixels(self) -> float:
        """Scene size in megapixels."""
        return self.width * self.height / 1e6


@contextmanager
def _gdal_env() -> Iterator[None]:
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        yield


def _open(path: str | os.PathLike[str]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        if not Path(path).exists():
            raise InputError(f"{path}: scene file not found") from None
        raise InputError(f"{path}: cannot open as a raster; is it a corrupt or unsupported "
                         f"file? ({exc})") from None


def default_scene_id(path: str | os.PathLike[str]) -> str:
    """Scene id derived from a file name: its stem with unsafe characters replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-.") or "scene"
    return stem[:128]


def inspect_scene(path: str | os.PathLike[str], scene_id: str | None = None) -> SceneInfo:
    """Open a scene and check it is a georeferenced raster.

    Raises:
        InputError: the file is missing, unreadable, or has no CRS or geotransform.
    """
    with _gdal_env(), _open(path) as dataset:
        return _scene_info(dataset, Path(path), scene_id)


def _scene_info(dataset: Any, path: Path, scene_id: str | None) -> SceneInfo:
    if dataset.crs is None:
        raise InputError(f"{path}: the raster has no CRS; expected a georeferenced GeoTIFF "
                         "with a CRS and a geotransform")
    if dataset.transform.is_identity:
        extra = " (it has ground control points only; warp it first)" if dataset.gcps[0] else ""
        raise InputError(f"{path}: the raster has no geotransform{extra}; expected a "
                         "georeferenced GeoTIFF")
    crs = to_crs(dataset.crs)
    try:
        gsd = scene_gsd_m(dataset.transform, crs,
                          at_px=(dataset.width / 2, dataset.height / 2))
    except InputError:
        gsd = None
    sid = scene_id if scene_id is not None else default_scene_id(path)
    if not _SCENE_ID.fullmatch(sid):
        raise ConfigError(f"scene id {sid!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return SceneInfo(path=path, scene_id=sid, width=dataset.width, height=dataset.height,
                     count=dataset.count, dtype=str(dataset.dtypes[0]), crs=crs,
                     transform=dataset.transform, gsd_m=gsd)


# --------------------------------------------------------------------------- tile geometry


def resolve_tile_px(params: TilingConfig, scene: SceneInfo) -> tuple[int, int]:
    """Tile edge and overlap in pixels for this scene (metre sizes use the scene's GSD).

    Raises:
        ConfigError: the sizes make no valid grid for this scene.
    """
    if params.tile_size_m is not None:
        if scene.gsd_m is None or scene.gsd_m <= 0:
            raise ConfigError(f"{scene.path}: tile_size_m needs the scene's ground sample "
                              "distance, which its CRS does not give; set tile_size in pixels")
        tile_px = round(params.tile_size_m / scene.gsd_m)
        if not 32 <= tile_px <= 4096:
            raise ConfigError(f"{scene.path}: tile_size_m {params.tile_size_m} m at "
                              f"{scene.gsd_m:.3g} m GSD is {tile_px} px; expected 32..4096 px")
    else:
        tile_px = params.tile_size_px_default
    overlap_px = round(params.overlap * tile_px) if params.overlap < 1 else round(params.overlap)
    if overlap_px >= tile_px:
        raise ConfigError(f"overlap {params.overlap} is {overlap_px} px, which is not less than "
                          f"the tile ({tile_px} px)")
    return tile_px, overlap_px


def _grid_starts(length_px: int, tile_px: int, stride_px: int) -> list[int]:
    if length_px <= tile_px:
        return [0]
    steps = math.ceil((length_px - tile_px) / stride_px)
    # The last tile is shifted inward to end on the edge (never padded).
    return [min(i * stride_px, length_px - tile_px) for i in range(steps + 1)]


def tile_grid(width_px: int, height_px: int, tile_px: int, overlap_px: int) -> list[PixelWindow]:
    """Row-major tile windows covering every pixel of a ``width_px`` x ``height_px`` scene.

    Neighbours overlap by at least ``overlap_px``; edge tiles are shifted inward, so all
    windows lie inside the scene and have the full tile size unless the scene is smaller.

    Raises:
        ConfigError: sizes are not positive or the overlap is not smaller than the tile.
    """
    if width_px <= 0 or height_px <= 0 or tile_px <= 0:
        raise ConfigError(f"tile grid needs positive sizes, got scene {width_px}x{height_px} "
                          f"and tile {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ConfigError(f"overlap {overlap_px} px must be >= 0 and < the tile ({tile_px} px)")
    stride = tile_px - overlap_px
    tile_w, tile_h = min(tile_px, width_px), min(tile_px, height_px)
    return [PixelWindow(col, row, tile_w, tile_h)
            for row in _grid_starts(height_px, tile_px, stride)
            for col in _grid_starts(width_px, tile_px, stride)]


def _tile_id(scene_id: str, window: PixelWindow) -> str:
    return (f"{scene_id}_x{window.col_off}_y{window.row_off}"
            f"_w{window.width}_h{window.height}")


# --------------------------------------------------------------------------- radiometry


@dataclass(frozen=True)
class Stretch:
    """Band selection and per-band linear stretch to 8-bit RGB, fixed for a whole scene.

    Attributes:
        bands: 1-based band indexes read for R, G, B (one index means grey).
        low: Per-band value mapped to 0.
        high: Per-band value mapped to 255.
        identity: uint8 input passes through unchanged (``low``/``high`` are 0/255).
    """

    bands: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    identity: bool = False

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Map a ``(len(bands), h, w)`` array to a contiguous ``(h, w, 3)`` uint8 image."""
        if self.identity and data.dtype == np.uint8:
            out = data
        else:
            low = np.asarray(self.low, dtype=np.float32)[:, None, None]
            scale = 255.0 / (np.asarray(self.high, dtype=np.float32)[:, None, None] - low)
            scaled = data.astype(np.float32)  # in place from here: one float buffer
            scaled -= low
            scaled *= scale
            np.clip(scaled, 0, 255, out=scaled)
            np.nan_to_num(scaled, copy=False)
            out = np.rint(scaled, out=scaled).astype(np.uint8)
        if out.shape[0] == 1:
            return np.ascontiguousarray(np.repeat(out.transpose(1, 2, 0), 3, axis=2))
        return np.ascontiguousarray(out.transpose(1, 2, 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in the tile index."""
        return {"bands": list(self.bands), "low": list(self.low), "high": list(self.high),
                "identity": self.identity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stretch:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["bands"]), tuple(data["low"]), tuple(data["high"]),
                   bool(data.get("identity", False)))


def _select_bands(dataset: Any, bands: Sequence[int] | None, source: str) -> tuple[int, ...]:
    if bands is None:
        return (1, 2, 3) if dataset.count >= 3 else (1,)
    if len(bands) not in (1, 3):
        raise ConfigError(f"bands {list(bands)}: give 1 band (grey) or 3 bands (R, G, B)")
    missing = [b for b in bands if not 1 <= b <= dataset.count]
    if missing:
        raise ConfigError(f"{source}: bands {missing} do not exist; the scene has "
                          f"{dataset.count} band(s), numbered from 1")
    return tuple(int(b) for b in bands)


def _sample_windows(dataset: Any) -> list[PixelWindow]:
    """Windows spread over the scene, each inside one block, so each costs one block decode."""
    block_h, block_w = dataset.block_shapes[0]
    w, h = min(STRETCH_SAMPLE_PX, dataset.width), min(STRETCH_SAMPLE_PX, dataset.height)
    windows = []
    for i in range(STRETCH_SAMPLE_WINDOWS):
        for j in range(STRETCH_SAMPLE_WINDOWS):
            col = round((dataset.width - w) * (j + 0.5) / STRETCH_SAMPLE_WINDOWS)
            row = round((dataset.height - h) * (i + 0.5) / STRETCH_SAMPLE_WINDOWS)
            if w <= block_w and h <= block_h:  # move to the start of the block it begins in
                col = min(col - col % block_w, dataset.width - w)
                row = min(row - row % block_h, dataset.height - h)
            windows.append(PixelWindow(col, row, w, h))
    return sorted(set(windows))


def scene_stretch(dataset: Any, bands: Sequence[int] | None = None,
                  percentiles: tuple[float, float] = (2.0, 98.0)) -> Stretch:
    """The scene's 8-bit stretch, from its overviews or a fixed sample of 64 windows.

    Args:
        dataset: An open rasterio dataset.
        bands: 1-based band indexes (1 or 3); default the first three, or band 1 when the
            scene has fewer than three.
        percentiles: Low and high percentiles of valid pixels mapped to 0 and 255.

    Raises:
        ConfigError: the bands do not exist or are not 1 or 3 of them.
    """
    chosen = _select_bands(dataset, bands, str(dataset.name))
    if dataset.dtypes[0] == "uint8" and all(dataset.dtypes[b - 1] == "uint8" for b in chosen):
        return Stretch(chosen, (0.0,) * len(chosen), (255.0,) * len(chosen), identity=True)
    if dataset.overviews(chosen[0]):
        scale = max(dataset.width, dataset.height) / 1024
        out_shape = (len(chosen), max(1, round(dataset.height / scale)),
                     max(1, round(dataset.width / scale)))
        try:
            data = dataset.read(chosen, out_shape=out_shape)
            invalid = _invalid_mask(dataset, data, None, chosen, out_shape[1:])
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"{dataset.name}: cannot read the overviews; the file may be "
                             f"corrupt ({exc.__cause__ or exc})") from None
        samples = [(data, invalid)]
    else:
        samples = [_read_region(dataset, w, chosen) for w in _sample_windows(dataset)]
    low, high = [], []
    for band in range(len(chosen)):
        values = np.concatenate([
            (d[band] if inv is None else d[band][~inv]).ravel() for d, inv in samples])
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(v) for v in np.percentile(values, percentiles))
        low.append(lo)
        high.append(hi if hi > lo else lo + 1.0)
    return Stretch(chosen, tuple(low), tuple(high))


# --------------------------------------------------------------------------- reading chips


@dataclass(frozen=True)
class Chip:
    """One window of a scene as 8-bit RGB.

    Attributes:
        window: Where the chip lies in the scene.
        rgb: ``(height, width, 3)`` uint8; nodata pixels are 0.
        valid: ``(height, width)`` bool mask of valid pixels, or None when all are valid.
        nodata_fraction: Share of invalid pixels.
    """

    window: PixelWindow
    rgb: np.ndarray
    valid: np.ndarray | None
    nodata_fraction: float


def _invalid_mask(dataset: Any, data: np.ndarray, window: PixelWindow | None,
                  bands: Sequence[int], shape: tuple[int, int]) -> np.ndarray | None:
    flags = [dataset.mask_flag_enums[b - 1] for b in bands]
    invalid: np.ndarray | None = None
    if all(f == [MaskFlags.all_valid] for f in flags):
        pass
    elif all(MaskFlags.nodata in f for f in flags):
        # GDAL's rule: a pixel is nodata when every band holds its nodata value.
        per_band = []
        for i, b in enumerate(bands):
            nodata = dataset.nodatavals[b - 1]
            per_band.append(np.isnan(data[i]) if np.isnan(nodata) else data[i] == nodata)
        invalid = np.logical_and.reduce(per_band)
    else:  # alpha band or internal mask
        kwargs: dict[str, Any] = {"out_shape": shape}
        if window is not None:
            kwargs["window"] = window.to_rasterio()
        invalid = dataset.dataset_mask(**kwargs) == 0
    if data.dtype.kind == "f":
        nan = np.isnan(data).any(axis=0)
        invalid = nan if invalid is None else invalid | nan
    return invalid


def _read_region(dataset: Any, window: PixelWindow, bands: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        # Read straight into a pixel-interleaved buffer: chips are (h, w, 3), so this saves a
        # transpose copy, and GDAL copies pixel-interleaved blocks faster this way.
        dtype = np.dtype(dataset.dtypes[bands[0] - 1])
        out = np.empty((window.height, window.width, len(bands)), dtype).transpose(2, 0, 1)
        data = dataset.read(list(bands), window=window.to_rasterio(), out=out)
        invalid = _invalid_mask(dataset, data, window, bands, (window.height, window.width))
    except rasterio.errors.RasterioError as exc:
        detail = exc.__cause__ or exc  # rasterio's own message only says "Read failed"
        raise InputError(f"{dataset.name}: cannot read pixels {window.bounds} "
                         f"(col_min, row_min, col_max, row_max); the file may be corrupt "
                         f"or truncated ({detail})") from None
    return data, invalid


def read_chip(dataset: Any, window: PixelWindow, stretch: Stretch) -> Chip:
    """Read one window as an 8-bit RGB chip (nodata pixels 0).

    Raises:
        InputError: the pixels cannot be read (corrupt or truncated file).
    """
    data, invalid = _read_region(dataset, window, stretch.bands)
    rgb = stretch.apply(data)
    if invalid is not None:
        rgb[invalid] = 0
    fraction = float(invalid.mean()) if invalid is not None else 0.0
    return Chip(window, rgb, None if invalid is None else ~invalid, fraction)


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _TileTask:
    index: int
    tile_id: str
    window: PixelWindow
    label_text: str
    mask_rings: tuple[np.ndarray, ...] = ()  # tile-local pixel rings to black out
    region_wkb: bytes | None = None  # tile-local valid region when the AOI cuts the tile


@dataclass(frozen=True)
class _RunTask:
    window: PixelWindow  # union of the tiles' windows: read once
    tiles: tuple[_TileTask, ...]


@dataclass(frozen=True)
class _WorkerSetup:
    scene_path: str
    stretch: Stretch
    shard_dir: str
    image_format: str
    jpeg_quality: int
    max_nodata_fraction: float


_WORKER: dict[str, Any] = {}


def _worker_init(setup: _WorkerSetup) -> None:
    cv2.setNumThreads(1)  # parallelism comes from processes
    env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)
    env.__enter__()
    _WORKER.update(setup=setup, env=env, dataset=_open(setup.scene_path))


def _worker_close() -> None:
    if "dataset" in _WORKER:
        _WORKER.pop("dataset").close()
        _WORKER.pop("env").__exit__(None, None, None)
        _WORKER.clear()


def _process_chunk(chunk: tuple[_RunTask, ...]) -> list[tuple[int, str, float]]:
    return [result for run in chunk for result in _process_run(run)]


def _process_run(run: _RunTask) -> list[tuple[int, str, float]]:
    setup: _WorkerSetup = _WORKER["setup"]
    data, invalid = _read_region(_WORKER["dataset"], run.window, setup.stretch.bands)
    rgb = setup.stretch.apply(data)
    del data
    if invalid is not None:
        rgb[invalid] = 0
    shard = Path(setup.shard_dir)
    if setup.image_format == "jpg":
        ext, encode_args = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, setup.jpeg_quality]
    else:
        ext, encode_args = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    results: list[tuple[int, str, float]] = []
    for tile in run.tiles:
        rows, cols = tile.window.relative_to(run.window).slices
        chip = rgb[rows, cols]
        chip_invalid = None if invalid is None else invalid[rows, cols]
        if tile.region_wkb is not None:
            outside = geometry_mask([shapely.from_wkb(tile.region_wkb)],
                                    out_shape=chip.shape[:2], transform=Affine.identity())
            chip = chip.copy()  # overlapping tiles share ``rgb``
            chip[outside] = 0
            chip_invalid = outside if chip_invalid is None else chip_invalid | outside
        fraction = float(chip_invalid.mean()) if chip_invalid is not None else 0.0
        if fraction > setup.max_nodata_fraction:
            results.append((tile.index, "nodata", fraction))
            continue
        if tile.mask_rings:
            chip = chip.copy() if tile.region_wkb is None else chip
            cv2.fillPoly(chip, list(tile.mask_rings), (0, 0, 0))
        ok, encoded = cv2.imencode(ext, chip[:, :, ::-1], encode_args)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"OpenCV could not encode tile {tile.tile_id}")
        (shard / "images" / f"{tile.tile_id}{ext}").write_bytes(encoded.tobytes())
        (shard / "labels" / f"{tile.tile_id}.txt").write_text(tile.label_text, encoding="utf-8")
        results.append((tile.index, "written", fraction))
    return results


# --------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class Annotations:
    """Validated annotations of one scene: pixel geometries and class indexes.

    Attributes:
        pixel_geoms: Kept polygons in scene pixels (repaired where needed).
        class_idx: Class index of each kept polygon.
        feature_idx: Position in the source file of each kept polygon.
        resolved_classes: Class name per input feature ('' when rejected).
        notes: Repairs and ignored features worth telling the user.
        rejected: Features ignored, each with its reason.
    """

    pixel_geoms: np.ndarray
    class_idx: np.ndarray
    feature_idx: np.ndarray
    resolved_classes: tuple[str, ...]  # per input feature; '' when rejected
    notes: tuple[str, ...]
    rejected: tuple[str, ...]


def _feature_class(feature: Feature, class_property: str | None) -> Any:
    keys = (class_property,) if class_property else CLASS_PROPERTIES
    for key in keys:
        if key in feature.properties:
            return feature.properties[key]
    return None


def load_annotations(labels_path: Path | None, scene: SceneInfo, classes: Sequence[str],
                     normalise: Callable[[str], str | None] | None = None,
                     class_property: str | None = None) -> Annotations:
    """Read, validate and convert a scene's GeoJSON annotations to scene pixels.

    Shared by tiling and ingest, so a drop that ingest accepts always tiles.

    Raises:
        InputError: a feature has no or an unknown class, the CRS cannot be reprojected, or no
            annotation overlaps the scene (names the file and the features).
    """
    normalise = normalise or _case_insensitive(classes)
    empty = np.empty(0, dtype=object)
    if labels_path is None:
        return Annotations(empty, np.empty(0, int), np.empty(0, int), (), (), ())
    features, crs = read_geojson(labels_path)
    source = str(labels_path)
    unknown: dict[str, list[str]] = {}
    missing: list[str] = []
    resolved: list[str] = []
    for feature in features:
        raw = _feature_class(feature, class_property)
        if raw is None:
            missing.append(feature.describe())
            resolved.append("")
            continue
        name = normalise(str(raw))
        if name is None or name not in classes:
            unknown.setdefault(str(raw), []).append(feature.describe())
            resolved.append("")
            continue
        resolved.append(name)
    if missing:
        looked = ", ".join(repr(k) for k in ((class_property,) if class_property
                                             else CLASS_PROPERTIES))
        raise InputError(f"{source}: {_listing(missing)} ha{'s' if len(missing) == 1 else 've'} "
                         f"no class property (looked for {looked})")
    if unknown:
        parts = [f"{raw!r} in {_listing(where)}" for raw, where in sorted(unknown.items())]
        raise InputError(f"{source}: unknown class {'; '.join(parts)}; expected one of: "
                         f"{', '.join(classes)}")
    notes: list[str] = []
    rejected: list[str] = []
    geoms = np.array([f.geometry for f in features], dtype=object)
    keep = np.ones(len(features), dtype=bool)
    polygonal = np.isin(shapely.get_type_id(geoms), (3, 6))  # Polygon, MultiPolygon
    for i in np.flatnonzero(~polygonal):
        keep[i] = False
        rejected.append(f"{features[i].describe()}: {geoms[i].geom_type} is not polygonal; "
                        "expected Polygon or MultiPolygon (feature ignored)")
    if keep.any():
        repaired, reasons = repair_polygons(geoms[keep])
        for local, i in enumerate(np.flatnonzero(keep)):
            if reasons[local] is None:
                continue
            if repaired[local] is None:
                keep[i] = False
                rejected.append(f"{features[i].describe()}: invalid geometry "
                                f"({reasons[local]}) with no area after repair (ignored)")
            else:
                notes.append(f"{features[i].describe()}: invalid geometry ({reasons[local]}) "
                             "repaired with make_valid")
                geoms[i] = repaired[local]
    zero_area = keep & (shapely.area(geoms) <= 0)
    for i in np.flatnonzero(zero_area):
        keep[i] = False
        rejected.append(f"{features[i].describe()}: polygon has no area (ignored)")
    kept_idx = np.flatnonzero(keep)
    try:
        scene_geoms = reproject_geometries(geoms[kept_idx], crs, scene.crs)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    pixel = np.asarray(map_to_pixel(scene_geoms, scene.transform), dtype=object)
    scene_box = shapely.box(0, 0, scene.width, scene.height)
    inside = shapely.intersects(pixel, scene_box) if len(pixel) else np.zeros(0, bool)
    if len(pixel) and not inside.any():
        minx, miny, maxx, maxy = shapely.total_bounds(np.asarray(scene_geoms, dtype=object))
        raise InputError(
            f"{source}: none of its {len(pixel)} annotations overlaps scene {scene.path} "
            f"(annotations span x {minx:.6g}..{maxx:.6g}, y {miny:.6g}..{maxy:.6g} in the "
            f"scene CRS; the scene spans {_scene_bounds_text(scene)}); wrong scene or CRS?")
    if (~inside).any():
        notes.append(f"{int((~inside).sum())} of {len(pixel)} annotations lie outside the "
                     "scene (ignored)")
    class_of = {name: i for i, name in enumerate(classes)}
    kept_idx = kept_idx[inside]
    return Annotations(
        pixel_geoms=pixel[inside],
        class_idx=np.array([class_of[resolved[i]] for i in kept_idx], dtype=int),
        feature_idx=kept_idx,
        resolved_classes=tuple(resolved),
        notes=tuple(notes),
        rejected=tuple(rejected),
    )


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _scene_bounds_text(scene: SceneInfo) -> str:
    minx, miny, maxx, maxy = PixelWindow(0, 0, scene.width, scene.height).map_bounds(
        scene.transform)
    return f"x {minx:.6g}..{maxx:.6g}, y {miny:.6g}..{maxy:.6g}"


def _load_aoi(aoi_path: Path, scene: SceneInfo) -> shapely.Geometry:
    features, crs = read_geojson(aoi_path)
    if not features:
        raise InputError(f"{aoi_path}: the AOI file has no features")
    repaired, _ = repair_polygons([f.geometry for f in features])
    polygons = [g for g in repaired if g is not None and g.geom_type in ("Polygon",
                                                                          "MultiPolygon")]
    if not polygons:
        raise InputError(f"{aoi_path}: the AOI has no Polygon or MultiPolygon feature")
    try:
        scene_geoms = reproject_geometries(np.array(polygons, dtype=object), crs, scene.crs)
    except InputError as exc:
        raise InputError(f"{aoi_path}: {exc}") from None
    pixel = shapely.union_all(map_to_pixel(scene_geoms, scene.transform))
    clipped = shapely.intersection(pixel, shapely.box(0, 0, scene.width, scene.height))
    if clipped.is_empty or clipped.area <= 0:
        raise InputError(f"{aoi_path}: the AOI does not overlap scene {scene.path} (scene "
                         f"spans {_scene_bounds_text(scene)})")
    return clipped


# --------------------------------------------------------------------------- shard identity


def params_hash(params: TilingConfig, classes: Sequence[str]) -> str:
    """Name of the shard directory for these tiling parameters and class list.

    ``workers`` does not change the output and is left out.
    """
    payload = {"tiler_version": TILER_VERSION, "classes": list(classes),
               "params": params.model_dump(mode="json", exclude={"workers"})}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scene_fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
        handle.seek(max(0, size - (1 << 20)))
        tail = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return {"size": size, "head_sha256": head, "tail_sha256": tail}


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


# --------------------------------------------------------------------------- tile_scene


@dataclass
class _TilePlan:
    """Per-tile label work, decided before any pixel is read."""

    windows: list[PixelWindow]
    tile_ids: list[str]
    in_aoi: np.ndarray
    region_wkb: list[bytes | None]
    label_text: list[str]
    objects: list[dict[str, int]]
    object_sets: list[np.ndarray]  # object positions labelled per tile
    mask_rings: list[tuple[np.ndarray, ...]]
    partial: list[list[dict[str, Any]]]


def _plan_tiles(windows: list[PixelWindow], scene_id: str, objects: Annotations,
                classes: Sequence[str], aoi_px: shapely.Geometry | None,
                min_visibility: float) -> _TilePlan:
    n = len(windows)
    bounds = np.array([w.bounds for w in windows], dtype=float)
    boxes = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    regions = boxes.copy()
    region_wkb: list[bytes | None] = [None] * n
    in_aoi = np.ones(n, dtype=bool)
    if aoi_px is not None:
        shapely.prepare(aoi_px)
        in_aoi = shapely.intersects(aoi_px, boxes) & (
            shapely.area(shapely.intersection(boxes, aoi_px)) > 0)
        cut = np.flatnonzero(in_aoi & ~shapely.covers(aoi_px, boxes))
        if cut.size:
            regions[cut] = shapely.intersection(boxes[cut], aoi_px)
            for i in cut:  # workers rasterise the region in tile-local pixels
                local = shapely.transform(regions[i], lambda xy, o=bounds[i, :2]: xy - o)
                region_wkb[i] = shapely.to_wkb(local)
    label_lines: list[list[str]] = [[] for _ in range(n)]
    counts: list[dict[str, int]] = [{} for _ in range(n)]
    labelled: list[list[int]] = [[] for _ in range(n)]
    rings: list[list[np.ndarray]] = [[] for _ in range(n)]
    partial: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    geoms = objects.pixel_geoms
    if len(geoms):
        tree = shapely.STRtree(geoms)
        candidates = np.flatnonzero(in_aoi)
        tile_pos, obj = tree.query(regions[candidates], predicate="intersects")
        tile = candidates[tile_pos]
        order = np.lexsort((obj, tile))
        tile, obj = tile[order], obj[order]
        clipped = shapely.intersection(geoms[obj], regions[tile])
        visible = shapely.area(clipped) / shapely.area(geoms[obj])
        clip_bounds = shapely.bounds(clipped)
        for t, o, part, fraction, box in zip(tile, obj, clipped, visible, clip_bounds,
                                             strict=True):
            name = classes[objects.class_idx[o]]
            win = windows[t]
            if fraction >= min_visibility - 1e-9:
                x0 = (box[0] - win.col_off) / win.width
                x1 = (box[2] - win.col_off) / win.width
                y0 = (box[1] - win.row_off) / win.height
                y1 = (box[3] - win.row_off) / win.height
                x0, x1, y0, y1 = (min(max(v, 0.0), 1.0) for v in (x0, x1, y0, y1))
                label_lines[t].append(f"{objects.class_idx[o]} {(x0 + x1) / 2:.6f} "
                                      f"{(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
                counts[t][name] = counts[t].get(name, 0) + 1
                labelled[t].append(int(o))
            elif fraction > 0:
                offset = np.array([win.col_off, win.row_off], dtype=float)
                for polygon in shapely.get_parts(part):
                    if polygon.geom_type != "Polygon" or polygon.is_empty:
                        continue
                    ring = np.asarray(polygon.exterior.coords, dtype=float) - offset
                    rings[t].append(np.round(ring).astype(np.int32))
                partial[t].append({"class": name,
                                   "feature": int(objects.feature_idx[o]),
                                   "visible_fraction": round(float(fraction), 4)})
    return _TilePlan(
        windows=windows,
        tile_ids=[_tile_id(scene_id, w) for w in windows],
        in_aoi=in_aoi,
        region_wkb=region_wkb,
        label_text=["".join(f"{line}\n" for line in lines) for lines in label_lines],
        objects=counts,
        object_sets=[np.array(s, dtype=int) for s in labelled],
        mask_rings=[tuple(r) for r in rings],
        partial=partial,
    )


def _chunks(plan: _TilePlan, indexes: Sequence[int]) -> list[tuple[_RunTask, ...]]:
    """Group tiles into work units that read each scene block about once.

    A run is up to ``MAX_RUN_TILES`` neighbouring tiles of one grid row, read as one window
    (no re-read of the horizontal overlap). A chunk stacks the runs of up to
    ``CHUNK_TILE_ROWS`` grid rows over the same columns; one worker reads them top to bottom,
    so the blocks under the vertical overlap are still in GDAL's block cache.
    """
    col_rank = {c: k for k, c in enumerate(sorted({w.col_off for w in plan.windows}))}
    row_rank = {r: k for k, r in enumerate(sorted({w.row_off for w in plan.windows}))}
    groups: dict[tuple[int, int], dict[int, list[int]]] = {}
    for i in indexes:
        win = plan.windows[i]
        col, row = col_rank[win.col_off], row_rank[win.row_off]
        key = (row // CHUNK_TILE_ROWS, col // MAX_RUN_TILES)
        groups.setdefault(key, {}).setdefault(row, []).append(i)
    chunks = []
    for key in sorted(groups):
        runs = []
        for row in sorted(groups[key]):
            tiles = sorted(groups[key][row], key=lambda k: plan.windows[k].col_off)
            start = 0
            for end in range(1, len(tiles) + 1):
                gap = end < len(tiles) and (col_rank[plan.windows[tiles[end]].col_off]
                                            != col_rank[plan.windows[tiles[end - 1]].col_off]
                                            + 1)
                if end == len(tiles) or gap:
                    runs.append(_run_task(plan, tiles[start:end]))
                    start = end
        chunks.append(tuple(runs))
    return chunks


def _run_task(plan: _TilePlan, tiles: Sequence[int]) -> _RunTask:
    first, last = plan.windows[tiles[0]], plan.windows[tiles[-1]]
    union = PixelWindow.from_bounds(first.col_off, first.row_off, last.col_off + last.width,
                                    first.row_off + first.height)
    return _RunTask(union, tuple(
        _TileTask(i, plan.tile_ids[i], plan.windows[i], plan.label_text[i],
                  plan.mask_rings[i], plan.region_wkb[i]) for i in tiles))


def _background_order(candidates: np.ndarray, seed: int, scene_id: str) -> np.ndarray:
    scene_key = int.from_bytes(hashlib.sha256(scene_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, scene_key])
    return candidates[rng.permutation(len(candidates))]


def _mp_context() -> BaseContext:
    # fork starts workers in milliseconds and does not re-import the caller's __main__ (spawn
    # would demand an ``if __name__ == "__main__"`` guard of every script). It is safe here: no
    # dataset is open in the parent when the pool starts, and workers open their own.
    return get_context("fork" if sys.platform == "linux" else "spawn")


class _Executor:
    """Runs tile runs in worker processes (or in-process for one worker)."""

    def __init__(self, setup: _WorkerSetup, workers: int) -> None:
        self.setup = setup
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Executor:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_mp_context(),
                initializer=_worker_init, initargs=(self.setup,))
            # Start the workers now, before the caller starts threads (a progress bar): fork
            # copies only the forking thread.
            self.pool.submit(int).result()
        else:
            _worker_init(self.setup)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            _worker_close()

    def run(self, chunks: Sequence[tuple[_RunTask, ...]], on_done: Callable[[int], None]
            ) -> list[tuple[int, str, float]]:
        results: list[tuple[int, str, float]] = []
        if self.pool is None:
            for chunk in chunks:
                results.extend(_process_chunk(chunk))
                on_done(_tile_count(chunk))
            return results
        # Bounded submission keeps queued tasks (and their label payloads) small.
        pending: dict[Future[list[tuple[int, str, float]]], int] = {}
        queue = iter(chunks)
        for chunk in queue:
            pending[self.pool.submit(_process_chunk, chunk)] = _tile_count(chunk)
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                results.extend(future.result())
                on_done(pending.pop(future))
                nxt = next(queue, None)
                if nxt is not None:
                    pending[self.pool.submit(_process_chunk, nxt)] = _tile_count(nxt)
        return results


def _tile_count(chunk: tuple[_RunTask, ...]) -> int:
    return sum(len(run.tiles) for run in chunk)


@contextmanager
def _progress_bar(enabled: bool, scene_id: str) -> Iterator[Callable[[int, int], None]]:
    if not enabled:
        yield lambda advance, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("tiling {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(scene_id, total=None)

        def update(advance: int, total: int) -> None:
            bar.update(task, advance=advance, total=total)

        yield update


def _case_insensitive(classes: Sequence[str]) -> Callable[[str], str | None]:
    lookup = {c.strip().lower(): c for c in classes}
    return lambda raw: lookup.get(raw.strip().lower())


def tile_scene(scene_path: str | os.PathLike[str], labels_path: str | os.PathLike[str] | None,
               classes: Sequence[str], out_dir: str | os.PathLike[str],
               params: TilingConfig | None = None, *, aoi: str | os.PathLike[str] | None = None,
               scene_id: str | None = None,
               class_normaliser: Callable[[str], str | None] | None = None,
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
        class_normaliser: Maps an annotation's class value to a class name or None (unknown);
            default: case-insensitive match against ``classes``.
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
    normalise = class_normaliser or _case_insensitive(classes)
    scene_path = Path(scene_path)
    labels = Path(labels_path) if labels_path is not None else None
    aoi_path = Path(aoi) if aoi is not None else None
    n_workers = max(1, workers if workers is not None else params.workers)
    if tile_extras is not None and (windows is None or len(tile_extras) != len(windows)):
        raise ConfigError("tile_extras needs windows, one mapping per window")
    if windows is not None and len(set(windows)) != len(windows):
        raise ConfigError("windows must be distinct")

    with _gdal_env():
        with _open(scene_path) as dataset:
            scene = _scene_info(dataset, scene_path, scene_id)
            bands = _select_bands(dataset, params.bands, str(scene_path))
        tile_px, overlap_px = resolve_tile_px(params, scene)
        objects = load_annotations(labels, scene, classes, normalise, class_property)
        aoi_px = _load_aoi(aoi_path, scene) if aoi_path is not None else None

        digest = params_hash(params, classes)
        group_dir = Path(out_dir) / digest
        shard_dir = group_dir / scene.scene_id
        source = {
            "scene": _scene_fingerprint(scene_path),
            "labels_sha256": _file_sha256(labels) if labels is not None else None,
            "aoi_sha256": _file_sha256(aoi_path) if aoi_path is not None else None,
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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    plan = _plan_tiles(windows, scene.scene_id, objects, classes, aoi_px,
                       params.min_visibility)
    with _open(scene.path) as dataset:
        stretch = scene_stretch(dataset, dataset_bands, params.stretch_percentiles)
    setup = _WorkerSetup(str(scene.path), stretch, str(tmp_dir), params.image_format,
                         params.jpeg_quality, params.max_nodata_fraction)
    n = len(windows)
    status: list[str] = ["outside_aoi" if not plan.in_aoi[i] else "background_cap"
                         for i in range(n)]
    nodata: list[float | None] = [None] * n
    # Chosen windows (mining) are all written: a hard negative is an empty chip on purpose.
    positive = [i for i in range(n) if plan.in_aoi[i] and (chosen or plan.label_text[i])]
    background = _background_order(
        np.array([] if chosen else
                 [i for i in range(n) if plan.in_aoi[i] and not plan.label_text[i]], int),
        params.seed, scene.scene_id)
    # One pass over positives and the background sample they allow, in grid order, so scene
    # blocks are decoded about once; then exact bookkeeping for tiles skipped for nodata.
    taken = min(len(background), round(params.background_ratio * len(positive)))
    first_pass = _chunks(plan, [*positive, *background[:taken].tolist()])
    use = min(workers, max(1, len(first_pass)))
    with _Executor(setup, use) as executor, _progress_bar(progress, scene.scene_id) as update:
        total = len(positive) + taken
        update(0, total)

        def record(results: list[tuple[int, str, float]]) -> None:
            for index, state, fraction in results:
                status[index] = state
                nodata[index] = round(fraction, 4)

        record(executor.run(first_pass, lambda k: update(k, total)))
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
            results = executor.run(_chunks(plan, batch), lambda k, t=total: update(k, t))
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
        "scene": {"path": str(scene.path), "width": scene.width, "height": scene.height,
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
