"""Coordinates and GeoJSON: the one place that converts between pixels and map units.

Conventions used by every stage (tiling, inference, evaluation, ingest, mining):

- Pixel coordinates are ``(col, row)`` as continuous values with ``(0, 0)`` at the top-left
  corner of the top-left pixel (rasterio's convention): pixel ``(c, r)`` covers
  ``[c, c + 1) x [r, r + 1)``. Names carry their units: ``_px`` for pixels, ``_m`` for metres;
  map coordinates are in the scene CRS's own units.
- Coordinate order is always ``x, y`` (easting/longitude first), whatever the CRS's axis order
  says, as in GeoJSON. Transformers are built with ``always_xy=True``.
- GeoJSON without a ``crs`` member is EPSG:4326 longitude/latitude (RFC 7946). The legacy
  (2008) ``crs`` member is honoured on read and written for any CRS other than EPSG:4326, so
  predictions in a UTM scene's CRS round-trip exactly.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely
from affine import Affine
from shapely.geometry.base import BaseGeometry

from retrain_lib.errors import InputError

__all__ = [
    "WGS84",
    "Feature",
    "PixelWindow",
    "map_to_pixel",
    "pixel_size",
    "pixel_to_map",
    "read_geojson",
    "repair_polygons",
    "reproject_geometries",
    "scene_gsd_m",
    "to_crs",
    "write_geojson",
]

WGS84 = pyproj.CRS.from_epsg(4326)

Geometries = BaseGeometry | np.ndarray | Sequence[BaseGeometry]


@dataclass(frozen=True)
class Feature:
    """One GeoJSON feature: a shapely geometry, its properties and where it came from.

    Attributes:
        geometry: The geometry, in the CRS of the collection it was read with.
        properties: The feature's properties (treat as read-only).
        id: The feature's ``id`` member, or its ``id`` property, if any.
        index: Position of the feature in its source file (0-based).
    """

    geometry: BaseGeometry
    properties: Mapping[str, Any] = field(default_factory=dict)
    id: str | int | None = None
    index: int = 0

    def describe(self) -> str:
        """How error messages name this feature, e.g. ``feature 3 (id 'a7')``."""
        return f"feature {self.index}" + ("" if self.id is None else f" (id {self.id!r})")


@dataclass(frozen=True, order=True)
class PixelWindow:
    """A rectangle of whole pixels: ``width`` x ``height`` pixels from ``(col_off, row_off)``."""

    col_off: int
    row_off: int
    width: int
    height: int

    def __post_init__(self) -> None:
        values = (self.col_off, self.row_off, self.width, self.height)
        if not all(isinstance(v, int | np.integer) for v in values):
            raise TypeError(f"PixelWindow needs integers, got {values}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"PixelWindow needs a positive size, got {self.width}x{self.height}")

    @classmethod
    def from_bounds(cls, col_min: int, row_min: int, col_max: int, row_max: int) -> PixelWindow:
        """Window spanning pixel bounds ``[col_min, col_max) x [row_min, row_max)``."""
        return cls(int(col_min), int(row_min), int(col_max - col_min), int(row_max - row_min))

    @classmethod
    def from_slices(cls, rows: slice, cols: slice) -> PixelWindow:
        """Window of numpy-style ``array[rows, cols]`` slices (explicit start and stop)."""
        return cls.from_bounds(cols.start, rows.start, cols.stop, rows.stop)

    @classmethod
    def from_rasterio(cls, window: Any) -> PixelWindow:
        """Window from a ``rasterio.windows.Window``, rounded outward to whole pixels."""
        col_min = math.floor(window.col_off)
        row_min = math.floor(window.row_off)
        col_max = math.ceil(window.col_off + window.width)
        row_max = math.ceil(window.row_off + window.height)
        return cls.from_bounds(col_min, row_min, col_max, row_max)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Pixel bounds ``(col_min, row_min, col_max, row_max)``, max exclusive."""
        return (self.col_off, self.row_off, self.col_off + self.width,
                self.row_off + self.height)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices that cut this window out of a scene-sized array."""
        col_min, row_min, col_max, row_max = self.bounds
        return slice(row_min, row_max), slice(col_min, col_max)

    @property
    def area_px(self) -> int:
        """Number of pixels in the window."""
        return self.width * self.height

    def to_rasterio(self) -> Any:
        """The equivalent ``rasterio.windows.Window``."""
        from rasterio.windows import Window

        return Window(self.col_off, self.row_off, self.width, self.height)

    def to_box(self) -> shapely.Polygon:
        """The window as a polygon in scene pixel coordinates."""
        return shapely.box(*self.bounds)

    def relative_to(self, outer: PixelWindow) -> PixelWindow:
        """This window with offsets measured from ``outer``'s top-left corner."""
        return PixelWindow(self.col_off - outer.col_off, self.row_off - outer.row_off,
                           self.width, self.height)

    def intersection(self, other: PixelWindow) -> PixelWindow | None:
        """The overlap of two windows, or None when they share no pixel."""
        a, b = self.bounds, other.bounds
        col_min, row_min = max(a[0], b[0]), max(a[1], b[1])
        col_max, row_max = min(a[2], b[2]), min(a[3], b[3])
        if col_max <= col_min or row_max <= row_min:
            return None
        return PixelWindow.from_bounds(col_min, row_min, col_max, row_max)

    def window_transform(self, transform: Affine) -> Affine:
        """Affine transform of the window's own pixel grid (pixel ``(0, 0)`` at its corner)."""
        return transform @ Affine.translation(self.col_off, self.row_off)

    def map_bounds(self, transform: Affine) -> tuple[float, float, float, float]:
        """``(min_x, min_y, max_x, max_y)`` of the window in map units of ``transform``."""
        col_min, row_min, col_max, row_max = self.bounds
        corners = np.array([[col_min, row_min], [col_max, row_min], [col_max, row_max],
                            [col_min, row_max]], dtype=float)
        xy = _apply_affine(transform, corners)
        return (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()),
                float(xy[:, 1].max()))


def to_crs(value: Any) -> pyproj.CRS:
    """A pyproj CRS from user input: ``"EPSG:32633"``, a URN, WKT, a rasterio CRS, an EPSG int.

    Raises:
        InputError: the value names no CRS pyproj knows.
    """
    if isinstance(value, pyproj.CRS):
        return value
    try:
        if hasattr(value, "to_wkt"):  # rasterio.crs.CRS and friends
            return pyproj.CRS.from_wkt(value.to_wkt())
        return pyproj.CRS.from_user_input(value)
    except pyproj.exceptions.CRSError as exc:
        raise InputError(f"not a coordinate reference system: {value!r} ({exc})") from None


def _apply_affine(transform: Affine, xy: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f = transform[:6]
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack((a * x + b * y + c, d * x + e * y + f))


def map_to_pixel(geoms: Geometries, transform: Affine) -> Any:
    """Map coordinates (the scene CRS) to continuous pixel ``(col, row)``; vectorised.

    Args:
        geoms: A shapely geometry or an array/sequence of them.
        transform: The scene's affine geotransform (pixel -> map).

    Returns:
        Geometries of the same shape in pixel coordinates.
    """
    inverse = ~transform
    return shapely.transform(geoms, lambda xy: _apply_affine(inverse, xy))


def pixel_to_map(geoms: Geometries, transform: Affine) -> Any:
    """Continuous pixel ``(col, row)`` to map coordinates of the scene CRS; vectorised."""
    return shapely.transform(geoms, lambda xy: _apply_affine(transform, xy))


def reproject_geometries(geoms: Geometries, src_crs: Any, dst_crs: Any) -> Any:
    """Reproject geometries between CRSs (x/y order, i.e. lon/lat for geographic CRSs).

    Raises:
        InputError: some coordinates have no finite image in ``dst_crs``; the message lists the
            0-based positions of the first offending geometries.
    """
    src, dst = to_crs(src_crs), to_crs(dst_crs)
    if src == dst:
        return geoms
    transformer = pyproj.Transformer.from_crs(src, dst, always_xy=True)

    def _transform(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack((x, y))

    out = shapely.transform(geoms, _transform)
    coords_ok = np.isfinite(shapely.bounds(out)).all(axis=-1)
    empty = shapely.is_empty(out)
    bad = np.flatnonzero(~(coords_ok | empty))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise InputError(f"{bad.size} geometries cannot be transformed from "
                         f"{_crs_name(src)} to {_crs_name(dst)} (positions {shown}); "
                         "are the coordinates in the declared CRS?")
    return out


def pixel_size(transform: Affine) -> tuple[float, float]:
    """Pixel width and height in map units of the transform (rotation-aware, positive)."""
    a, b, _, d, e, _ = transform[:6]
    return float(math.hypot(a, d)), float(math.hypot(b, e))


def scene_gsd_m(transform: Affine, crs: Any, *, at_px: tuple[float, float] = (0.0, 0.0)
                ) -> float:
    """Ground sample distance in metres: the mean of pixel width and height.

    Projected CRSs use their linear unit; for a geographic CRS the pixel is measured on the
    ellipsoid at ``at_px`` (pass the scene centre).

    Raises:
        InputError: the CRS has no usable unit.
    """
    crs = to_crs(crs)
    if crs.is_geographic:
        col, row = at_px
        corners = _apply_affine(transform, np.array([[col, row], [col + 1, row],
                                                     [col, row + 1]], dtype=float))
        geod = crs.get_geod() or pyproj.Geod(ellps="WGS84")
        _, _, width_m = geod.inv(corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1])
        _, _, height_m = geod.inv(corners[0, 0], corners[0, 1], corners[2, 0], corners[2, 1])
        return float((width_m + height_m) / 2)
    axis = crs.axis_info[0] if crs.axis_info else None
    factor = axis.unit_conversion_factor if axis is not None else None
    if not factor or not math.isfinite(factor):
        raise InputError(f"CRS {_crs_name(crs)} has no linear unit; cannot measure the GSD "
                         "in metres")
    width, height = pixel_size(transform)
    return float((width + height) / 2 * factor)


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


def _crs_name(crs: pyproj.CRS) -> str:
    authority = crs.to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else crs.name


def _legacy_crs_name(crs: pyproj.CRS) -> str:
    authority = crs.to_authority()
    if authority:
        return f"urn:ogc:def:crs:{authority[0]}::{authority[1]}"
    return crs.to_wkt()


def _is_wgs84_lonlat(crs: pyproj.CRS) -> bool:
    return crs.to_authority() in (("EPSG", "4326"), ("OGC", "CRS84"))


def _parse_crs_member(member: Any, source: str) -> pyproj.CRS:
    name: Any = member
    if isinstance(member, dict):
        props = member.get("properties") or {}
        kind = member.get("type")
        if kind == "name":
            name = props.get("name")
        elif kind == "EPSG":
            name = f"EPSG:{props.get('code')}"
        else:
            raise InputError(f"{source}: crs: unsupported crs member {member!r}; expected "
                             "{'type': 'name', 'properties': {'name': 'EPSG:32633'}}")
    if not isinstance(name, str | int):
        raise InputError(f"{source}: crs: expected a CRS name like 'EPSG:32633', got {name!r}")
    try:
        crs = pyproj.CRS.from_user_input(name)
    except pyproj.exceptions.CRSError:
        raise InputError(f"{source}: crs: unknown coordinate reference system {name!r}; "
                         "expected e.g. 'EPSG:32633' or 'urn:ogc:def:crs:EPSG::32633'") from None
    # GeoJSON coordinates are x/y; always_xy transforms make EPSG:4326 and CRS84 the same.
    return WGS84 if _is_wgs84_lonlat(crs) else crs


def read_geojson(path: str | os.PathLike[str]) -> tuple[list[Feature], pyproj.CRS]:
    """Read a GeoJSON FeatureCollection (or single Feature) and its CRS.

    An empty or whitespace-only file is an empty collection. Geometries are returned as they
    are, even when invalid (see :func:`repair_polygons`).

    Raises:
        InputError: the file is missing or not JSON, is not a FeatureCollection, has an
            unknown ``crs``, or a feature has no or a malformed geometry (the message names the
            file and the feature).
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{source}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: cannot read annotation file ({exc})") from None
    if not text.strip():
        return [], WGS84
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("type") not in ("FeatureCollection", "Feature"):
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{source}: expected a GeoJSON FeatureCollection, got {kind!r}")
    crs = _parse_crs_member(doc["crs"], source) if doc.get("crs") is not None else WGS84
    raw_features = doc.get("features") if doc["type"] == "FeatureCollection" else [doc]
    if not isinstance(raw_features, list):
        raise InputError(f"{source}: 'features' must be a list")
    features = [_parse_feature(raw, i, source) for i, raw in enumerate(raw_features)]
    return features, crs


def _parse_feature(raw: Any, index: int, source: str) -> Feature:
    if not isinstance(raw, dict) or raw.get("type") != "Feature":
        raise InputError(f"{source}: feature {index}: expected a GeoJSON Feature object")
    properties = raw.get("properties") or {}
    if not isinstance(properties, dict):
        raise InputError(f"{source}: feature {index}: 'properties' must be an object")
    fid = raw.get("id", properties.get("id"))
    fid = fid if isinstance(fid, str | int) and not isinstance(fid, bool) else None
    where = f"{source}: feature {index}" + ("" if fid is None else f" (id {fid!r})")
    geometry = raw.get("geometry")
    if geometry is None:
        raise InputError(f"{where}: has no geometry; expected a Polygon or MultiPolygon")
    try:
        geom = shapely.from_geojson(json.dumps(geometry))
    except (shapely.errors.GEOSException, ValueError, TypeError) as exc:
        raise InputError(f"{where}: malformed geometry ({exc})") from None
    return Feature(geometry=geom, properties=properties, id=fid, index=index)


def write_geojson(path: str | os.PathLike[str], features: Iterable[Feature], crs: Any) -> None:
    """Write features as a FeatureCollection, atomically (temp file, fsync, rename).

    A ``crs`` member (legacy GeoJSON 2008, ``urn:ogc:def:crs:EPSG::<code>``) is written for
    any CRS other than EPSG:4326, whose coordinates stay longitude/latitude per RFC 7946.
    """
    path = Path(path)
    crs = to_crs(crs)
    features = list(features)
    geometry_texts = shapely.to_geojson(np.array([f.geometry for f in features], dtype=object))
    parts: list[str] = []
    for feature, geometry_text in zip(features, np.atleast_1d(geometry_texts), strict=True):
        head = '{"type":"Feature",'
        if feature.id is not None:
            head += f'"id":{json.dumps(feature.id)},'
        properties = json.dumps(dict(feature.properties), default=_json_default)
        geometry_json = "null" if geometry_text is None else geometry_text
        parts.append(f'{head}"geometry":{geometry_json},"properties":{properties}}}')
    header = '{"type":"FeatureCollection",'
    if not _is_wgs84_lonlat(crs):
        header += ('"crs":{"type":"name","properties":{"name":'
                   f"{json.dumps(_legacy_crs_name(crs))}}}}},")
    text = header + '"features":[\n' + ",\n".join(parts) + "\n]}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"property value {value!r} is not JSON serialisable")
