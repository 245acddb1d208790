"""GeoJSON: the one reader and the one writer of feature collections.

GeoJSON without a ``crs`` member is EPSG:4326 longitude/latitude (RFC 7946). The legacy (2008)
``crs`` member is honoured on read and written for any CRS other than EPSG:4326, so
predictions in a UTM scene's CRS round-trip exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely
from shapely.geometry.base import BaseGeometry

from retrain_lib.core.errors import InputError
from retrain_lib.core.io import atomic_write_text
from retrain_lib.geo.crs import WGS84, is_wgs84_lonlat, to_crs

__all__ = ["Feature", "read_geojson", "write_geojson"]


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


def _legacy_crs_name(crs: pyproj.CRS) -> str:
    authority = crs.to_authority()
    if authority:
        return f"urn:ogc:def:crs:{authority[0]}::{authority[1]}"
    return crs.to_wkt()


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
    return WGS84 if is_wgs84_lonlat(crs) else crs


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
    _check_geometry(geometry, where)
    try:
        geom = shapely.from_geojson(json.dumps(geometry))
    except (shapely.errors.GEOSException, ValueError, TypeError) as exc:
        raise InputError(f"{where}: malformed geometry ({exc})") from None
    return Feature(geometry=geom, properties=properties, id=fid, index=index)


# How deep each geometry type nests its positions.
_POSITION_DEPTH = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2,
                   "Polygon": 2, "MultiPolygon": 3}


def _check_geometry(geometry: Any, where: str) -> None:
    """Say what is wrong with a geometry in the analyst's terms (which coordinate, what was
    expected), before the GEOS parser would answer with its own text."""
    if not isinstance(geometry, dict):
        raise InputError(f"{where}: 'geometry' must be an object, got {type(geometry).__name__}")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise InputError(f"{where}: a GeometryCollection needs a 'geometries' list")
        for i, member in enumerate(members):
            _check_geometry(member, f"{where}, geometry {i}")
        return
    if kind not in _POSITION_DEPTH:
        raise InputError(f"{where}: unknown geometry type {kind!r}; expected a Polygon or "
                         "MultiPolygon")
    if "coordinates" not in geometry:
        raise InputError(f"{where}: the {kind} has no 'coordinates'")
    coordinates = geometry["coordinates"]
    _check_positions(coordinates, _POSITION_DEPTH[kind], kind, where, "")
    polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" \
        else []
    for p, rings in enumerate(polygons):
        for r, ring in enumerate(rings):
            at = f"[{r}]" if kind == "Polygon" else f"[{p}][{r}]"
            if len(ring) < 4 or ring[0] != ring[-1]:
                raise InputError(f"{where}: {kind} ring coordinates{at} has {len(ring)} "
                                 "position(s); a ring needs at least 4, the last one "
                                 "repeating the first")


def _check_positions(value: Any, depth: int, kind: str, where: str, at: str) -> None:
    if not isinstance(value, list):
        raise InputError(f"{where}: {kind} coordinates{at}: got {json.dumps(value)[:40]}; "
                         f"expected {'a position [x, y]' if depth == 0 else 'a list'}")
    if depth > 0:
        for i, item in enumerate(value):
            _check_positions(item, depth - 1, kind, where, f"{at}[{i}]")
        return
    if len(value) not in (2, 3):
        raise InputError(f"{where}: {kind} coordinates{at}: a position has {len(value)} "
                         "number(s); expected [x, y] or [x, y, z]")
    for i, number in enumerate(value):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InputError(f"{where}: {kind} coordinates{at}[{i}]: got "
                             f"{json.dumps(number)[:40]}; expected a number")
        if not math.isfinite(number):
            raise InputError(f"{where}: {kind} coordinates{at}[{i}]: got "
                             f"{json.dumps(number)}; expected a finite number")


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
    if not is_wgs84_lonlat(crs):
        header += ('"crs":{"type":"name","properties":{"name":'
                   f"{json.dumps(_legacy_crs_name(crs))}}}}},")
    atomic_write_text(path, header + '"features":[\n' + ",\n".join(parts) + "\n]}\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"property value {value!r} is not JSON serialisable")
