"""Coordinates: the one place that converts between pixels and map units, and between CRSs.

Conventions used by every stage (tiling, inference, evaluation, ingest, mining):

- Pixel coordinates are ``(col, row)`` as continuous values with ``(0, 0)`` at the top-left
  corner of the top-left pixel (rasterio's convention): pixel ``(c, r)`` covers
  ``[c, c + 1) x [r, r + 1)``. Names carry their units: ``_px`` for pixels, ``_m`` for metres;
  map coordinates are in the scene CRS's own units.
- Coordinate order is always ``x, y`` (easting/longitude first), whatever the CRS's axis order
  says, as in GeoJSON. Transformers are built with ``always_xy=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import pyproj
import shapely
from affine import Affine
from shapely.geometry.base import BaseGeometry

from retrain_lib.core.errors import InputError

__all__ = [
    "WGS84",
    "Geometries",
    "apply_affine",
    "crs_name",
    "is_wgs84_lonlat",
    "map_to_pixel",
    "pixel_size",
    "pixel_to_map",
    "reproject_geometries",
    "scene_gsd_m",
    "to_crs",
]

WGS84 = pyproj.CRS.from_epsg(4326)

Geometries: TypeAlias = BaseGeometry | np.ndarray | Sequence[BaseGeometry]


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


def apply_affine(transform: Affine, xy: np.ndarray) -> np.ndarray:
    """Apply an affine transform to an ``(n, 2)`` array of ``x, y`` (or ``col, row``)."""
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
    return shapely.transform(geoms, lambda xy: apply_affine(inverse, xy))


def pixel_to_map(geoms: Geometries, transform: Affine) -> Any:
    """Continuous pixel ``(col, row)`` to map coordinates of the scene CRS; vectorised."""
    return shapely.transform(geoms, lambda xy: apply_affine(transform, xy))


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
                         f"{crs_name(src)} to {crs_name(dst)} (positions {shown}); "
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
        corners = apply_affine(transform, np.array([[col, row], [col + 1, row],
                                                     [col, row + 1]], dtype=float))
        geod = crs.get_geod() or pyproj.Geod(ellps="WGS84")
        _, _, width_m = geod.inv(corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1])
        _, _, height_m = geod.inv(corners[0, 0], corners[0, 1], corners[2, 0], corners[2, 1])
        return float((width_m + height_m) / 2)
    axis = crs.axis_info[0] if crs.axis_info else None
    factor = axis.unit_conversion_factor if axis is not None else None
    if not factor or not math.isfinite(factor):
        raise InputError(f"CRS {crs_name(crs)} has no linear unit; cannot measure the GSD "
                         "in metres")
    width, height = pixel_size(transform)
    return float((width + height) / 2 * factor)


def crs_name(crs: Any) -> str:
    """How messages name a CRS: ``EPSG:32633``, else its name."""
    crs = to_crs(crs)
    authority = crs.to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else crs.name


def is_wgs84_lonlat(crs: pyproj.CRS) -> bool:
    """Whether ``crs`` is WGS 84 longitude/latitude (EPSG:4326 or OGC CRS84)."""
    return crs.to_authority() in (("EPSG", "4326"), ("OGC", "CRS84"))


