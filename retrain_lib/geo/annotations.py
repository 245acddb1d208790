"""Annotations: GeoJSON features of one scene as validated polygons and boxes in its pixels.

Shared by ingest, tiling, evaluation and mining, so a drop that ingest accepts always tiles,
and truth is read the same way wherever it is scored. A feature's class is the first present
of the properties in :data:`CLASS_PROPERTIES` (or the one the caller names).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from retrain_lib.core.classes import ClassMapper
from retrain_lib.core.errors import InputError
from retrain_lib.geo.crs import Geometries, map_to_pixel, reproject_geometries
from retrain_lib.geo.geojson import Feature, read_geojson

if TYPE_CHECKING:  # the raster layer (rasterio) is not needed to read annotations
    from retrain_lib.geo.raster import SceneInfo

__all__ = [
    "CLASS_PROPERTIES",
    "Annotations",
    "SceneBoxes",
    "feature_class",
    "load_annotations",
    "load_aoi",
    "read_scene_boxes",
    "repair_polygons",
]

CLASS_PROPERTIES = ("class", "class_name", "label", "category")


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


def feature_class(feature: Feature, class_property: str | None = None) -> Any:
    """The feature's class value: ``class_property``, else the first of
    :data:`CLASS_PROPERTIES` it has; None when it has none."""
    keys = (class_property,) if class_property else CLASS_PROPERTIES
    for key in keys:
        if key in feature.properties:
            return feature.properties[key]
    return None


def load_annotations(labels_path: str | os.PathLike[str] | None, scene: SceneInfo,
                     mapper: ClassMapper, class_property: str | None = None) -> Annotations:
    """Read, validate and convert a scene's GeoJSON annotations to scene pixels.

    Shared by tiling and ingest, so a drop that ingest accepts always tiles. ``mapper`` maps
    the analysts' class spellings to the classes and their indexes.

    Raises:
        InputError: a feature has no or an unknown class, the CRS cannot be reprojected, or no
            annotation overlaps the scene (names the file and the features).
    """
    classes = mapper.classes
    empty = np.empty(0, dtype=object)
    if labels_path is None:
        return Annotations(empty, np.empty(0, int), np.empty(0, int), (), (), ())
    features, crs = read_geojson(labels_path)
    source = str(labels_path)
    unknown: dict[str, list[str]] = {}
    missing: list[str] = []
    resolved: list[str] = []
    for feature in features:
        raw = feature_class(feature, class_property)
        if raw is None:
            missing.append(feature.describe())
            resolved.append("")
            continue
        name = mapper.name(str(raw))
        if name is None:
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
            f"{source}: none of its {len(pixel)} annotations overlaps scene "
            f"{os.path.basename(scene.path)} "
            f"(annotations span x {minx:.6g}..{maxx:.6g}, y {miny:.6g}..{maxy:.6g} in the "
            f"scene CRS; the scene spans {scene.bounds_text()}); wrong scene or CRS?")
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


def load_aoi(aoi_path: str | os.PathLike[str], scene: SceneInfo) -> shapely.Geometry:
    """The area where annotations are complete, as one geometry in scene pixels.

    Raises:
        InputError: the file has no polygon, or the AOI misses the scene.
    """
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
                         f"spans {scene.bounds_text()})")
    return clipped




def repair_polygons(geoms: Geometries) -> tuple[np.ndarray, list[str | None]]:
    """Repair invalid polygons with ``make_valid`` and keep only their polygonal parts.

    Returns:
        ``(repaired, reasons)``: repaired geometries (None where nothing polygonal is left)
        and, per input, None when it was valid or GEOS's reason when it was repaired.
    """
    geoms = np.asarray(geoms, dtype=object).ravel()
    valid = shapely.is_valid(geoms)
    out = geoms.copy()
    reasons: list[str | None] = [None] * len(geoms)
    for i in np.flatnonzero(~valid):
        reasons[i] = str(shapely.is_valid_reason(geoms[i]))
        parts = _polygonal_parts(shapely.make_valid(geoms[i]))
        out[i] = (None if not parts else parts[0] if len(parts) == 1
                  else shapely.multipolygons(parts))
    return out, reasons


def _polygonal_parts(geom: BaseGeometry) -> list[shapely.Polygon]:
    parts: list[shapely.Polygon] = []
    for part in shapely.get_parts(geom):
        if part.geom_type == "Polygon" and not part.is_empty:
            parts.append(part)
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            parts.extend(_polygonal_parts(part))
    return parts


@dataclass(frozen=True, eq=False)
class SceneBoxes:
    """Boxes read from a GeoJSON file, in scene pixels (or map units without a scene).

    Attributes:
        boxes: ``(n, 4)`` envelopes ``x_min, y_min, x_max, y_max``.
        class_names: ``(n,)`` class name of each feature, as written in the file.
        scores: ``(n,)`` the ``score`` property, or None when the file has no scores.
        feature_index: ``(n,)`` position of each feature in the file.
        crs: CRS the boxes were measured in before any pixel conversion.
        file_crs: CRS of the file itself.
        source: The file.
    """

    boxes: np.ndarray
    class_names: tuple[str, ...]
    scores: np.ndarray | None
    feature_index: np.ndarray
    crs: Any
    file_crs: Any
    source: str


def read_scene_boxes(path: str | os.PathLike[str], *, crs: Any = None,
                     transform: Any = None, scores: bool = False,
                     class_property: str | None = None) -> SceneBoxes:
    """Read a GeoJSON file as boxes, reprojected to ``crs`` and converted to pixels.

    Args:
        path: A FeatureCollection of polygons (truth) or boxes (predictions).
        crs: Reproject into this CRS first (None: keep the file's CRS).
        transform: The scene's affine transform; given, boxes are envelopes in scene pixels.
        scores: Require a numeric ``score`` property on every feature.
        class_property: The property holding the class name; default the first present of
            ``class``, ``class_name``, ``label``, ``category`` (as the tiler reads them).

    Raises:
        InputError: the file is unreadable, or a feature has no class or no valid score
            (the message names the file and the feature).
    """
    source = str(path)
    features, file_crs = read_geojson(path)
    names: list[str] = []
    values: list[float] = []
    keys = (class_property,) if class_property else CLASS_PROPERTIES
    for feature in features:
        key = next((k for k in keys if k in feature.properties), keys[0])
        raw = feature.properties.get(key)
        if not isinstance(raw, str) or not raw.strip():
            raise InputError(f"{source}: {feature.describe()}: property {key!r} must be a "
                             f"class name, got {raw!r}")
        names.append(raw.strip())
        if scores:
            score = feature.properties.get("score")
            if (not isinstance(score, int | float) or isinstance(score, bool)
                    or not math.isfinite(score) or not 0 <= score <= 1):
                raise InputError(f"{source}: {feature.describe()}: property 'score' must be a "
                                 f"number in [0, 1], got {score!r}")
            values.append(float(score))
    geoms = np.array([f.geometry for f in features], dtype=object)
    target_crs = file_crs if crs is None else crs
    if len(geoms):
        try:
            geoms = reproject_geometries(geoms, file_crs, target_crs)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        if transform is not None:
            geoms = map_to_pixel(geoms, transform)
    empty = shapely.is_empty(geoms) if len(geoms) else np.zeros(0, dtype=bool)
    if empty.any():
        raise InputError(f"{source}: feature {int(np.flatnonzero(empty)[0])} has an empty "
                         "geometry")
    bounds = shapely.bounds(geoms).reshape(-1, 4) if len(geoms) else np.zeros((0, 4))
    return SceneBoxes(boxes=bounds.astype(np.float64), class_names=tuple(names),
                      scores=np.asarray(values, dtype=np.float64) if scores else None,
                      feature_index=np.array([f.index for f in features], dtype=np.int64),
                      crs=target_crs, file_crs=file_crs, source=source)


