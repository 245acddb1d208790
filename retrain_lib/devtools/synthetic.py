"""Synthetic georeferenced scenes for the demo, the tests and the benchmarks.

This module writes them; :mod:`~retrain_lib.devtools.synthetic_plan` places the objects and
:mod:`~retrain_lib.devtools.synthetic_render` draws the pixels.

A scene is a tiled (512 px blocks; a single smaller block below 512 px), deflate-compressed
GeoTIFF in a projected CRS (a UTM zone by default) at a set ground sample distance. It shows
small objects of each configured class on a textured background, plus look-alike decoys that
are *not* annotated, so that a detector trained without them makes false positives that
hard-negative mining can learn from.

Drop layout (what ingest reads): one folder per drop, one GeoTIFF and one GeoJSON per scene,
paired by file stem::

    <drop_dir>/
        <scene_id>.tif        3 bands (R, G, B) uint8, or 4 bands (R, G, B, NIR) uint16 0..4095
        <scene_id>.geojson    FeatureCollection of Polygons with a "class" property and a
                              legacy "crs" member, e.g. urn:ogc:def:crs:EPSG::32633

Appearance is keyed by class *index*, so any object type's classes work (up to
:data:`MAX_CLASSES`):

====  ===========  ===============================================================
idx   size (px)    look
====  ===========  ===============================================================
0     14 x 7       bright body, dark windshield band near the front, dark rear window
1     28 x 10      bright trailer with two roof rails, dark gap, red/blue cab with windshield
2     22 x 12      body with a dark "+" marking
3     36 x 11      yellow/white body, rows of dark window panes along both sides
4     18 x 18      square body with a dark ring
5     30 x 14      two-tone body (front/back halves) split by a dark line
6     12 x 12      small square body with a dark centre dot
7     40 x 13      long body with dark transverse bars
====  ===========  ===============================================================

Sizes vary by +-8 % per object, orientations are uniform, and every object casts a short
shadow to the lower right. Decoys take the size of a random scene class and are one of:
a uniform patch in that class's colours with a shadow but no marking (the hard kind), a bare
shadow, or a hollow bright outline. Regions: ``vegetated`` (textured greens, tree canopy) and
``arid`` (tan sand with gravel patches; objects are dusted toward the sand colour, so they
stand out less). Objects and decoys never overlap and lie wholly inside the valid area.

Everything is a function of :attr:`SceneSpec.seed`: the object list comes from one generator,
the background texture from a hash of (seed, lattice point) and the pixel noise from a
generator seeded by (seed, block row, block column), so blocks can be rendered in any order and
a 20000 x 20000 scene is written block by block without holding the raster in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from shapely.geometry import Polygon, box
from shapely.geometry.polygon import orient

from retrain_lib.core.console import progress_bar
from retrain_lib.core.errors import ConfigError, StorageError
from retrain_lib.core.io import atomic_path
from retrain_lib.devtools.synthetic_plan import (
    BLOCK_PX,
    MAX_CLASSES,
    SceneSpec,
    SyntheticObject,
    SyntheticScene,
    plan_objects,
    plan_placements,
    scene_transform,
)
from retrain_lib.devtools.synthetic_render import render_block, salts
from retrain_lib.geo.geojson import Feature, write_geojson

__all__ = [
    "MAX_CLASSES",
    "SceneSpec",
    "SyntheticObject",
    "SyntheticScene",
    "make_drop",
    "plan_objects",
    "scene_transform",
    "write_annotations",
    "write_scene",
]

_GDAL_CACHE_BYTES = 16 * 2**20  # rasterio takes an integer GDAL_CACHEMAX in bytes


def _block_size(spec: SceneSpec) -> int:
    # TIFF tiles must be multiples of 16; small scenes get one tile instead of a mostly empty one.
    return min(BLOCK_PX, 16 * math.ceil(max(spec.width, spec.height) / 16))


def write_scene(path: str | Path, spec: SceneSpec, *, progress: bool = False,
                on_block: Callable[[int, int], None] | None = None) -> SyntheticScene:
    """Write a scene GeoTIFF block by block; memory does not grow with the scene size.

    The file appears under its final name only when complete (written to a hidden temporary
    name in the same folder, then renamed).

    Args:
        path: Where the GeoTIFF goes; parent folders are created.
        spec: What the scene looks like.
        progress: Show a progress bar on the terminal.
        on_block: Called as ``on_block(done, total)`` after each block.

    Returns:
        The scene, with ``annotations_path=None``.

    Raises:
        ConfigError: the objects do not fit in the scene.
        StorageError: the file cannot be written.
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window
    from shapely import STRtree

    path = Path(path)
    planned = plan_placements(spec)
    placements = [p for _, p in planned]
    tree = STRtree([box(*p.footprint()) for p in placements])
    transform = scene_transform(spec)
    block = _block_size(spec)
    n_rows, n_cols = math.ceil(spec.height / block), math.ceil(spec.width / block)
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": spec.width, "height": spec.height, "count": spec.bands,
        "dtype": spec.dtype, "crs": spec.crs, "transform": transform, "tiled": True,
        "blockxsize": block, "blockysize": block, "compress": "deflate", "predictor": 2,
        "interleave": "pixel", "photometric": "RGB", "BIGTIFF": "IF_SAFER",
    }
    if spec.nodata_border:
        profile["nodata"] = 0
    block_salts = salts(spec.seed)
    try:
        # A small block cache: each block is written once, so caching only costs memory.
        with atomic_path(path, keep_suffix=True) as temporary, \
                rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES), \
                rasterio.open(temporary, "w", **profile) as dst, \
                progress_bar(f"writing {spec.scene_id}", total=n_rows * n_cols,
                             enabled=progress) as bar:
            dst.descriptions = ("red", "green", "blue", "nir")[: spec.bands]
            if spec.bands == 4:
                dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                                   ColorInterp.undefined]
            done = 0
            for brow in range(n_rows):
                for bcol in range(n_cols):
                    data = render_block(spec, placements, tree, block_salts, block, brow, bcol)
                    window = Window(bcol * block, brow * block, data.shape[2], data.shape[1])
                    dst.write(data, window=window)
                    done += 1
                    bar.advance()
                    if on_block is not None:
                        on_block(done, n_rows * n_cols)
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise StorageError(f"{path}: cannot write synthetic scene ({exc})") from None
    return SyntheticScene(path=path, annotations_path=None, crs=spec.crs, transform=transform,
                          objects=tuple(obj for obj, _ in planned), spec=spec)


def write_annotations(path: str | Path, scene: SyntheticScene, *,
                      to_epsg: int | None = None) -> Path:
    """Write the truth of a scene as GeoJSON; decoys are left out.

    Each feature is a Polygon (the object's oriented rectangle, counter-clockwise) with a
    ``class`` property. A legacy ``crs`` member names any CRS other than EPSG:4326 (whose
    coordinates are longitude/latitude, as RFC 7946 says).

    Args:
        path: Where the GeoJSON goes; parent folders are created.
        scene: A scene from :func:`write_scene`.
        to_epsg: Reproject to this CRS (e.g. 4326, written as lon/lat) instead of the scene CRS.

    Returns:
        ``path``.

    Raises:
        ConfigError: ``to_epsg`` is not a known EPSG code.
        StorageError: the file cannot be written.
    """
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    path = Path(path)
    epsg = scene.spec.epsg if to_epsg is None else to_epsg
    transformer = None
    if epsg != scene.spec.epsg:
        try:
            target = CRS.from_epsg(epsg)
        except CRSError:
            raise ConfigError(f"to_epsg: got {epsg!r}; not a known EPSG code") from None
        transformer = Transformer.from_crs(scene.crs, target, always_xy=True)
        digits = 9 if target.is_geographic else 3
    else:
        digits = 3
    features = []
    for i, obj in enumerate(scene.annotations):
        ring = list(orient(obj.polygon_map, sign=1.0).exterior.coords)
        if transformer is not None:
            xs, ys = transformer.transform([x for x, _ in ring], [y for _, y in ring])
            ring = list(zip(xs, ys, strict=True))
        polygon = Polygon([(round(x, digits), round(y, digits)) for x, y in ring])
        features.append(Feature(geometry=polygon, properties={"class": obj.class_name},
                                index=i))
    try:
        write_geojson(path, features, f"EPSG:{epsg}")
    except OSError as exc:
        raise StorageError(f"{path}: cannot write ({exc})") from None
    return path


def make_drop(drop_dir: str | Path, specs: Sequence[SceneSpec], *, progress: bool = False,
              annotations_epsg: int | None = None) -> list[SyntheticScene]:
    """Write a drop: ``<drop_dir>/<scene_id>.tif`` and ``<scene_id>.geojson`` per spec.

    Args:
        drop_dir: The drop folder; created if missing.
        specs: One per scene; scene ids must be unique.
        progress: Show a progress bar per scene.
        annotations_epsg: Write annotations in this CRS instead of the scene CRS.

    Returns:
        The scenes, each with its ``annotations_path``.

    Raises:
        ConfigError: no specs, repeated scene ids, or objects that do not fit.
        StorageError: a file cannot be written.
    """
    drop_dir = Path(drop_dir)
    if not specs:
        raise ConfigError(f"{drop_dir}: a drop needs at least one scene spec")
    ids = [s.scene_id for s in specs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{drop_dir}: scene ids must be unique in a drop; repeated: "
                          f"{', '.join(repeated)}")
    for spec in specs:  # fail on a spec that cannot work before writing anything
        plan_placements(spec)
    scenes = []
    for spec in specs:
        scene = write_scene(drop_dir / f"{spec.scene_id}.tif", spec, progress=progress)
        geojson = write_annotations(drop_dir / f"{spec.scene_id}.geojson", scene,
                                    to_epsg=annotations_epsg)
        scenes.append(replace(scene, annotations_path=geojson))
    return scenes

