"""The spatial index of a dataset version's chips: which chips cover a place on the map.

Written with the dataset card as ``datasets/<type>/<version>/chips.gpkg``: a GeoPackage (its
R-tree answers a bounding-box query without reading every row; QGIS opens it as a layer) with
one polygon per distinct chip, in longitude/latitude (EPSG:4326) whatever the scenes' CRSs,
and what provenance needs: the chip's scene, region, split, source (regular or hard), mining
reason and cycle, repeats in training, and the hashes of its shard index and of the scene
annotations it was cut with. ``autoretrain trace`` reads it to find the chips under a
detection without scanning any tile index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from retrain_lib.core.errors import InputError

__all__ = ["IndexedChip", "bounds_to_lonlat", "query_chip_index", "read_chip_index",
           "write_chip_index"]

LAYER = "chips"
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class IndexedChip:
    """One distinct chip of a dataset version, as the spatial index keeps it."""

    image_key: str
    scene_id: str
    region: str
    split: str
    """``train`` or ``val``."""
    source: str
    """``regular`` (tiled from a cataloged scene) or ``hard`` (mined)."""
    reason: str
    """The mining reason of a hard chip (``false_positive``, ``false_negative``)."""
    mining_cycle: str
    """The cycle whose mining wrote a hard chip."""
    repeats: int
    """Entries of the chip in ``train.txt`` (0 for validation chips)."""
    shard_prefix: str
    shard_sha256: str
    labels_sha256: str
    """SHA-256 of the scene annotations the shard was cut with (its label revision)."""
    bounds_lonlat: tuple[float, float, float, float]


_COLUMNS = [f.name for f in fields(IndexedChip) if f.name != "bounds_lonlat"]
_INT_COLUMNS = {"repeats"}


def write_chip_index(path: str | os.PathLike[str], chips: Sequence[IndexedChip]) -> None:
    """Write ``chips`` as a GeoPackage with a spatial index (atomically)."""
    import shapely
    from pyogrio.raw import write

    from retrain_lib.core.io import atomic_path

    bounds = np.array([c.bounds_lonlat for c in chips], dtype=float).reshape(-1, 4)
    geoms = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    data = [np.array([getattr(c, name) for c in chips],
                     dtype=np.int32 if name in _INT_COLUMNS else object)
            for name in _COLUMNS]
    with atomic_path(path, keep_suffix=True) as partial:
        write(str(partial), shapely.to_wkb(geoms) if len(chips) else np.zeros(0, dtype=object),
              data, list(_COLUMNS), layer=LAYER, driver="GPKG", geometry_type="Polygon",
              crs="EPSG:4326", layer_options={"SPATIAL_INDEX": "YES"})


def _read(path: str | os.PathLike[str], bbox: tuple[float, float, float, float] | None
          ) -> list[IndexedChip]:
    import shapely
    from pyogrio.errors import DataLayerError, DataSourceError
    from pyogrio.raw import read

    try:
        meta, _, geoms, data = read(str(path), layer=LAYER, bbox=bbox)
    except (DataSourceError, DataLayerError) as exc:
        raise InputError(f"{path}: not a chip index of a dataset version ({exc})") from None
    names = list(meta["fields"])
    missing = sorted(set(_COLUMNS) - set(names))
    if missing:
        raise InputError(f"{path}: chip index without column(s) {', '.join(missing)}")
    columns = {name: data[names.index(name)] for name in _COLUMNS}
    boxes = shapely.bounds(shapely.from_wkb(geoms)) if len(geoms) else np.zeros((0, 4))
    chips = []
    for i in range(len(boxes)):
        row: dict[str, Any] = {name: (int(columns[name][i]) if name in _INT_COLUMNS
                                      else str(columns[name][i])) for name in _COLUMNS}
        west, south, east, north = (float(v) for v in boxes[i])
        chips.append(IndexedChip(**row, bounds_lonlat=(west, south, east, north)))
    return chips


def read_chip_index(path: str | os.PathLike[str]) -> list[IndexedChip]:
    """Every chip of the index.

    Raises:
        InputError: the file is not a chip index.
    """
    return _read(path, None)


def query_chip_index(path: str | os.PathLike[str], lon: float, lat: float, *,
                     radius_m: float = 0.0) -> list[IndexedChip]:
    """The chips whose footprint lies within ``radius_m`` of a point (0: that cover it).

    The R-tree narrows the rows to a bounding box; the distance is then measured on the
    chips' lon/lat boxes, scaled to metres at the point's latitude (exact enough at chip size).

    Raises:
        InputError: the file is not a chip index.
    """
    scale_lon = METRES_PER_DEGREE * max(math.cos(math.radians(lat)), 1e-6)
    dlat, dlon = radius_m / METRES_PER_DEGREE, radius_m / scale_lon
    near = []
    for chip in _read(path, (lon - dlon, lat - dlat, lon + dlon, lat + dlat)):
        west, south, east, north = chip.bounds_lonlat
        dx_m = max(west - lon, 0.0, lon - east) * scale_lon
        dy_m = max(south - lat, 0.0, lat - north) * METRES_PER_DEGREE
        if math.hypot(dx_m, dy_m) <= radius_m:
            near.append(chip)
    return sorted(near, key=lambda c: (c.source != "hard", c.image_key))


def bounds_to_lonlat(bounds: Sequence[tuple[float, float, float, float]], crs_wkt: str
                    ) -> list[tuple[float, float, float, float]]:
    """Bounds in a scene CRS as lon/lat bounds (the box of the reprojected box)."""
    import shapely

    from retrain_lib.geo.crs import WGS84, reproject_geometries

    if not bounds:
        return []
    array = np.asarray(bounds, dtype=float)
    boxes = shapely.box(array[:, 0], array[:, 1], array[:, 2], array[:, 3])
    # Densified so that a box in a projected CRS keeps its extent after reprojection.
    lonlat = reproject_geometries(shapely.segmentize(boxes, max_segment_length=(
        np.maximum(array[:, 2] - array[:, 0], array[:, 3] - array[:, 1]).max() / 4 or 1.0)),
        crs_wkt, WGS84)
    return [tuple(float(v) for v in b) for b in shapely.bounds(lonlat)]  # type: ignore[misc]
