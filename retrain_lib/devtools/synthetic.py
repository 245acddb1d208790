"""Synthetic georeferenced scenes for the demo, the tests and the benchmarks.

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

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from shapely.geometry import Polygon, box
from shapely.geometry.polygon import orient

from retrain_lib.core.console import progress_bar
from retrain_lib.core.errors import ConfigError, StorageError
from retrain_lib.core.io import atomic_path
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

Region = Literal["vegetated", "arid"]
RGB = tuple[float, float, float]

_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MIN_SIZE = 64
_MAX_SIZE = 200_000
_BLOCK = 512
_GDAL_CACHE_BYTES = 16 * 2**20  # rasterio takes an integer GDAL_CACHEMAX in bytes
# Shadow offset (columns, rows) in pixels and how much it darkens: the sun is to the upper left.
_SUN = (2.0, 1.5)
_SHADOW_DARKEN = 0.5
_SUPERSAMPLE = 3
_MARGIN_PX = 3.0
_DARK: RGB = (0.06, 0.07, 0.09)
_SIZE_JITTER = 0.08

# Random streams, kept apart so adding draws to one never shifts another.
_TAG_PLAN, _TAG_NOISE, _TAG_TEXTURE = 1, 2, 3


@dataclass(frozen=True)
class _ClassStyle:
    length: float
    width: float
    marking: str
    palette: tuple[RGB, ...]
    accents: tuple[RGB, ...] = ()


_WHITE: RGB = (0.92, 0.92, 0.90)
_SILVER: RGB = (0.74, 0.75, 0.77)
_RED: RGB = (0.75, 0.13, 0.12)
_BLUE: RGB = (0.16, 0.28, 0.66)
_YELLOW: RGB = (0.90, 0.79, 0.18)
_ORANGE: RGB = (0.92, 0.52, 0.12)

_CLASS_STYLES: tuple[_ClassStyle, ...] = (
    _ClassStyle(14, 7, "windshield", (_WHITE, _SILVER, _RED, _BLUE, _YELLOW)),
    _ClassStyle(28, 10, "cab", (_WHITE, (0.84, 0.84, 0.86), _ORANGE), (_RED, _BLUE)),
    _ClassStyle(22, 12, "plus", (_ORANGE, _WHITE, (0.95, 0.85, 0.55))),
    _ClassStyle(36, 11, "windows", (_YELLOW, _WHITE)),
    _ClassStyle(18, 18, "ring", ((0.80, 0.80, 0.80), (0.45, 0.75, 0.85))),
    _ClassStyle(30, 14, "split", (_WHITE, _SILVER), (_BLUE, _RED, (0.2, 0.5, 0.3))),
    _ClassStyle(12, 12, "dot", ((0.85, 0.35, 0.65), _WHITE)),
    _ClassStyle(40, 13, "bars", ((0.80, 0.80, 0.74), (0.70, 0.38, 0.20))),
)
MAX_CLASSES = len(_CLASS_STYLES)
"""How many classes synthetic scenes can tell apart."""

_DECOY_KINDS = ("patch", "shadow", "outline")
_DECOY_WEIGHTS = (0.5, 0.25, 0.25)


@dataclass(frozen=True)
class _Region:
    base: RGB
    light: RGB
    patch: RGB  # tree canopy (vegetated) or gravel (arid)
    nir: tuple[float, float, float]  # base, light, patch
    patch_threshold: float
    fine_amplitude: float
    dust: float  # how far object colours are pulled toward ``base``


_REGIONS: dict[str, _Region] = {
    "vegetated": _Region((0.22, 0.33, 0.15), (0.40, 0.49, 0.25), (0.10, 0.19, 0.09),
                         (0.55, 0.68, 0.62), 0.60, 0.07, 0.0),
    "arid": _Region((0.74, 0.64, 0.48), (0.84, 0.76, 0.61), (0.58, 0.50, 0.39),
                    (0.50, 0.56, 0.42), 0.66, 0.04, 0.2),
}


@dataclass(frozen=True)
class SceneSpec:
    """What one synthetic scene looks like.

    Attributes:
        scene_id: File stem of the scene; letters, digits, ``_``, ``-`` and ``.``.
        width: Width in pixels.
        height: Height in pixels.
        gsd_m: Ground sample distance in metres per pixel.
        epsg: A projected CRS in metres (default UTM zone 33N).
        origin: Map coordinates (x, y) of the top-left corner. ``None`` derives one from
            ``scene_id`` and ``seed``, so distinct scenes almost never overlap.
        region: Background: ``"vegetated"`` or ``"arid"``.
        classes: Class names, in model index order; appearance follows the index.
        objects_per_class: Objects of each class.
        decoys: Look-alike objects that are not annotated.
        clusters: 0 spreads objects uniformly over the scene. N > 0 gathers them around N
            centres (parking lots, yards) and scatters the decoys over the rest, as in real
            scenes where look-alikes lie mostly in chips the tiler keeps few of.
        nodata_border: Width in pixels of a nodata frame along every edge (0: none, and no
            nodata value is declared).
        bands: 3 (R, G, B) or 4 (R, G, B, NIR).
        dtype: ``"uint8"`` (1..255) or ``"uint16"`` (12-bit values 1..4095); 0 is nodata.
        seed: Everything random follows from it.
    """

    scene_id: str
    width: int = 1024
    height: int = 1024
    gsd_m: float = 0.5
    epsg: int = 32633
    origin: tuple[float, float] | None = None
    region: Region = "vegetated"
    classes: tuple[str, ...] = ("car", "truck")
    objects_per_class: int = 20
    decoys: int = 10
    clusters: int = 0
    nodata_border: int = 0
    bands: Literal[3, 4] = 3
    dtype: Literal["uint8", "uint16"] = "uint8"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        where = f"scene {self.scene_id!r}"
        if not isinstance(self.scene_id, str) or not _SCENE_ID.fullmatch(self.scene_id):
            raise ConfigError(f"scene_id: got {self.scene_id!r}; expected 1-128 letters, "
                              "digits, '_', '-' or '.', starting with a letter or digit")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or not _MIN_SIZE <= value <= _MAX_SIZE:
                raise ConfigError(f"{where}: {name}: got {value!r}; expected an integer "
                                  f"from {_MIN_SIZE} to {_MAX_SIZE} pixels")
        if not isinstance(self.gsd_m, int | float) or not 0.01 <= self.gsd_m <= 1000:
            raise ConfigError(f"{where}: gsd_m: got {self.gsd_m!r}; expected metres per pixel "
                              "between 0.01 and 1000")
        _projected_crs(self.epsg, where)
        if self.origin is not None and (
                len(self.origin) != 2 or not all(math.isfinite(c) for c in self.origin)):
            raise ConfigError(f"{where}: origin: got {self.origin!r}; expected (x, y) of the "
                              "top-left corner in map units")
        if self.region not in _REGIONS:
            raise ConfigError(f"{where}: region: got {self.region!r}; expected one of "
                              f"{', '.join(_REGIONS)}")
        if not self.classes or len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"{where}: classes: got {len(self.classes)}; synthetic scenes "
                              f"support 1 to {MAX_CLASSES} classes")
        if any(not isinstance(c, str) or not c.strip() for c in self.classes):
            raise ConfigError(f"{where}: classes: got {self.classes!r}; expected non-empty "
                              "names")
        if len({c.lower() for c in self.classes}) != len(self.classes):
            raise ConfigError(f"{where}: classes: got {self.classes!r}; names must be unique")
        for name in ("objects_per_class", "decoys", "clusters", "nodata_border", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{where}: {name}: got {value!r}; expected an integer >= 0")
        limit = min(self.width, self.height) // 4
        if self.nodata_border > limit:
            raise ConfigError(f"{where}: nodata_border: got {self.nodata_border}; expected at "
                              f"most a quarter of the smaller side ({limit} px)")
        if self.bands not in (3, 4):
            raise ConfigError(f"{where}: bands: got {self.bands!r}; expected 3 (RGB) or 4 "
                              "(RGB + NIR)")
        if self.dtype not in ("uint8", "uint16"):
            raise ConfigError(f"{where}: dtype: got {self.dtype!r}; expected uint8 or uint16")

    @property
    def crs(self) -> str:
        """The scene CRS as ``EPSG:<code>``."""
        return f"EPSG:{self.epsg}"


@dataclass(frozen=True)
class SyntheticObject:
    """One rendered object: an annotated instance of a class, or a decoy.

    Attributes:
        class_name: The class, or ``None`` for a decoy.
        polygon_px: Oriented rectangle in pixel coordinates (column, row; pixel corners at
            integers, so the centre of the top-left pixel is (0.5, 0.5)).
        polygon_map: The same rectangle in the scene CRS.
        is_decoy: True for look-alikes that must not be detected.
        kind: The marking of a class (e.g. ``"windshield"``) or the decoy kind
            (``"patch"``, ``"shadow"``, ``"outline"``).
        angle_deg: Orientation of the long axis, degrees clockwise from the column axis.
    """

    class_name: str | None
    polygon_px: Polygon
    polygon_map: Polygon
    is_decoy: bool
    kind: str
    angle_deg: float


@dataclass(frozen=True)
class SyntheticScene:
    """A written scene and the truth about it.

    Attributes:
        path: The GeoTIFF.
        annotations_path: Its GeoJSON, once written.
        crs: The scene CRS, e.g. ``EPSG:32633``.
        transform: Affine pixel-to-map transform.
        objects: Every object, decoys included (annotations leave decoys out).
        spec: What was asked for.
    """

    path: Path
    annotations_path: Path | None
    crs: str
    transform: Any  # affine.Affine; typed loosely so importing this module stays cheap
    objects: tuple[SyntheticObject, ...]
    spec: SceneSpec = field(repr=False)

    @property
    def annotations(self) -> tuple[SyntheticObject, ...]:
        """The objects that are annotated (decoys excluded)."""
        return tuple(o for o in self.objects if not o.is_decoy)

    def counts(self) -> dict[str, int]:
        """Objects per class in class order, plus ``"decoys"``."""
        result = {name: 0 for name in self.spec.classes}
        for obj in self.annotations:
            result[obj.class_name] += 1  # type: ignore[index]
        result["decoys"] = len(self.objects) - len(self.annotations)
        return result


@dataclass(frozen=True)
class _Placement:
    """How to draw one object; pixel units, angle in radians."""

    kind: str
    cx: float
    cy: float
    length: float
    width: float
    angle: float
    body: tuple[float, ...]
    accent: tuple[float, ...]
    casts_shadow: bool

    def footprint(self) -> tuple[float, float, float, float]:
        """Pixel bounds covering the object and its shadow, with a pixel to spare."""
        hx, hy = _half_extent(self.length, self.width, self.angle)
        return (self.cx - hx - 1, self.cy - hy - 1,
                self.cx + hx + _SUN[0] + 1, self.cy + hy + _SUN[1] + 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _projected_crs(epsg: object, where: str) -> Any:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if not _is_int(epsg):
        raise ConfigError(f"{where}: epsg: got {epsg!r}; expected an integer EPSG code")
    try:
        crs = CRS.from_epsg(int(epsg))  # type: ignore[call-overload]  # an int, checked above
    except CRSError:
        raise ConfigError(f"{where}: epsg: got {epsg}; not a known EPSG code") from None
    units = {axis.unit_name for axis in crs.axis_info}
    if not crs.is_projected or units != {"metre"}:
        raise ConfigError(f"{where}: epsg: got {epsg} ({crs.name}); expected a projected CRS "
                          "in metres, e.g. a UTM zone such as 32633, because gsd_m is in metres")
    return crs


def _half_extent(length: float, width: float, angle: float) -> tuple[float, float]:
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    return length / 2 * c + width / 2 * s, length / 2 * s + width / 2 * c


def _default_origin(spec: SceneSpec) -> tuple[float, float]:
    """Top-left corner on a grid of slots around the centre of the CRS's area of use."""
    from pyproj import Transformer

    crs = _projected_crs(spec.epsg, f"scene {spec.scene_id!r}")
    area = crs.area_of_use
    lon, lat = ((area.west + area.east) / 2, (area.south + area.north) / 2) if area else (0, 0)
    x_c, y_c = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    extent_m = max(spec.width, spec.height) * spec.gsd_m
    slot = (math.ceil(extent_m / 1000) + 1) * 1000.0
    half = max(1, int(200_000 // slot))  # stay within ~200 km of the centre of the zone
    digest = hashlib.sha256(f"{spec.scene_id}\0{spec.seed}".encode()).digest()
    h = int.from_bytes(digest[:8], "little")
    i = h % (2 * half + 1) - half
    j = (h // (2 * half + 1)) % (2 * half + 1) - half
    return round(x_c / slot + i) * slot, round(y_c / slot + j) * slot


def scene_transform(spec: SceneSpec) -> Any:
    """The affine pixel-to-map transform of a scene (north up, square pixels)."""
    from affine import Affine

    x0, y0 = spec.origin if spec.origin is not None else _default_origin(spec)
    return Affine(spec.gsd_m, 0.0, float(x0), 0.0, -spec.gsd_m, float(y0))


def _object_colour(rgb: RGB, region: _Region, rng: np.random.Generator) -> tuple[float, ...]:
    """Jittered colour as (R, G, B, NIR); painted metal is about as bright in NIR as in RGB."""
    gain = rng.uniform(0.9, 1.05)
    colour = [min(1.0, c * gain) for c in rgb]
    colour = [c + (b - c) * region.dust for c, b in zip(colour, region.base, strict=True)]
    return (*colour, 0.8 * sum(colour) / 3 + 0.05)


def _dark() -> tuple[float, ...]:
    return (*_DARK, 0.05)


def _clustered_cells(rng: np.random.Generator, nx: int, ny: int, n_objects: int,
                     n_decoys: int, clusters: int) -> np.ndarray:
    """Cells for ``n_objects`` gathered around ``clusters`` centres, then scattered decoys."""
    n_cells = nx * ny
    centres = rng.choice(n_cells, size=min(clusters, n_cells), replace=False)
    col, row = np.arange(n_cells) % nx, np.arange(n_cells) // nx
    distance = np.min(np.hypot(col[:, None] - centres % nx, row[:, None] - centres // nx),
                      axis=1)
    # Jitter of up to two cells roughens the lots' edges; ties go to the random key too.
    order = np.argsort(distance + rng.uniform(0, 2, n_cells), kind="stable")
    objects = rng.permutation(order[:n_objects])  # classes mixed within each lot
    decoys = rng.choice(order[n_objects:], size=n_decoys, replace=False)
    return np.concatenate([objects, decoys]).astype(np.int64)


def _plan(spec: SceneSpec) -> list[tuple[SyntheticObject, _Placement]]:
    """Place every object and decoy: one per grid cell, so nothing overlaps."""
    from shapely import affinity

    rng = np.random.default_rng([spec.seed, _TAG_PLAN])
    region = _REGIONS[spec.region]
    styles = _CLASS_STYLES[: len(spec.classes)]
    grow = 1 + _SIZE_JITTER
    diagonal = max(math.hypot(s.length * grow, s.width * grow) for s in styles)
    cell = math.ceil(diagonal + 2 * max(_SUN) + 2 * _MARGIN_PX)
    border = spec.nodata_border
    nx, ny = (spec.width - 2 * border) // cell, (spec.height - 2 * border) // cell
    items: list[int | None] = [k for k in range(len(spec.classes))
                               for _ in range(spec.objects_per_class)]
    items += [None] * spec.decoys
    if len(items) > nx * ny:
        raise ConfigError(
            f"scene {spec.scene_id!r}: {spec.objects_per_class} objects per class x "
            f"{len(spec.classes)} classes + {spec.decoys} decoys = {len(items)} do not fit in "
            f"{spec.width}x{spec.height} px with a {border} px border; at most {nx * ny} fit "
            f"(one per {cell} px cell); use a larger scene or fewer objects")
    transform = scene_transform(spec)
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
    if spec.clusters and items:
        cells = _clustered_cells(rng, nx, ny, len(items) - spec.decoys, spec.decoys,
                                 spec.clusters)
    else:
        cells = (rng.choice(nx * ny, size=len(items), replace=False) if items
                 else np.zeros(0, dtype=np.int64))
    planned: list[tuple[SyntheticObject, _Placement]] = []
    for item, cell_index in zip(items, cells, strict=True):
        is_decoy = item is None
        style_index = int(rng.integers(len(styles))) if item is None else item
        style = styles[style_index]
        length = style.length * rng.uniform(1 - _SIZE_JITTER, grow)
        width = style.width * rng.uniform(1 - _SIZE_JITTER, grow)
        angle = rng.uniform(0, 2 * math.pi)
        body = _object_colour(style.palette[rng.integers(len(style.palette))], region, rng)
        accent = body
        if style.accents:
            accent = _object_colour(style.accents[rng.integers(len(style.accents))], region,
                                    rng)
        kind = style.marking
        if is_decoy:
            kind = str(rng.choice(_DECOY_KINDS, p=_DECOY_WEIGHTS))
        # Centre jittered within the cell so the object and its shadow stay inside it.
        hx, hy = _half_extent(length, width, angle)
        col, row = int(cell_index) % nx, int(cell_index) // nx
        x_lo, y_lo = border + col * cell, border + row * cell
        cx = rng.uniform(x_lo + _MARGIN_PX + hx, x_lo + cell - _MARGIN_PX - _SUN[0] - hx)
        cy = rng.uniform(y_lo + _MARGIN_PX + hy, y_lo + cell - _MARGIN_PX - _SUN[1] - hy)
        placement = _Placement(kind, cx, cy, length, width, angle, body, accent,
                               casts_shadow=kind not in ("shadow", "outline"))
        c, s = math.cos(angle), math.sin(angle)
        corners = [(cx + du * c - dv * s, cy + du * s + dv * c)
                   for du, dv in ((length / 2, width / 2), (-length / 2, width / 2),
                                  (-length / 2, -width / 2), (length / 2, -width / 2))]
        polygon_px = Polygon(corners)
        obj = SyntheticObject(
            class_name=None if item is None else spec.classes[item],
            polygon_px=polygon_px,
            polygon_map=affinity.affine_transform(polygon_px, matrix),
            is_decoy=is_decoy,
            kind=kind,
            angle_deg=math.degrees(angle),
        )
        planned.append((obj, placement))
    return planned


def plan_objects(spec: SceneSpec) -> tuple[SyntheticObject, ...]:
    """The objects and decoys a scene will show, without writing anything.

    Raises:
        ConfigError: they do not fit in the scene.
    """
    return tuple(obj for obj, _ in _plan(spec))


# --- rendering -----------------------------------------------------------------------------


def _hash01(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """A uniform value in [0, 1) for each lattice point; a pure function of its inputs."""
    h = (iy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        ix.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(salt)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _value_noise(row0: int, col0: int, h: int, w: int, cell: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1] over global pixel positions, so blocks join seamlessly."""
    gx = (np.arange(col0, col0 + w) + 0.5) / cell
    gy = (np.arange(row0, row0 + h) + 0.5) / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    lat_x = np.arange(ix[0], ix[-1] + 2)
    lat_y = np.arange(iy[0], iy[-1] + 2)
    lattice = _hash01(lat_y[:, None], lat_x[None, :], salt)
    lx = ix - ix[0]
    # Interpolate along columns on the few lattice rows, then along rows.
    rows = lattice[:, lx] * (1 - fx) + lattice[:, lx + 1] * fx
    ly = iy - iy[0]
    noise: np.ndarray = rows[ly] * (1 - fy)[:, None] + rows[ly + 1] * fy[:, None]
    return noise


def _salts(seed: int) -> tuple[int, int, int]:
    state = np.random.SeedSequence([seed, _TAG_TEXTURE]).generate_state(3, np.uint64)
    return int(state[0]), int(state[1]), int(state[2])


def _background(spec: SceneSpec, row0: int, col0: int, h: int, w: int,
                salts: tuple[int, int, int]) -> np.ndarray:
    region = _REGIONS[spec.region]
    coarse = _value_noise(row0, col0, h, w, 160.0, salts[0])
    medium = _value_noise(row0, col0, h, w, 28.0, salts[1])
    fine = _value_noise(row0, col0, h, w, 5.0, salts[2])
    base = np.array([*region.base, region.nir[0]], np.float32)[: spec.bands]
    light = np.array([*region.light, region.nir[1]], np.float32)[: spec.bands]
    patch = np.array([*region.patch, region.nir[2]], np.float32)[: spec.bands]
    img = np.empty((h, w, spec.bands), np.float32)
    img[:] = light - base
    img *= coarse[..., None]
    img += base
    # Soft-edged patches: tree canopy in vegetated land, gravel in arid land.
    blob = np.clip((0.8 * medium + 0.2 * fine - region.patch_threshold) / 0.1, 0, 1)
    img += (patch - img) * blob[..., None]
    img *= (1 + region.fine_amplitude * (fine - 0.5))[..., None]
    return img


def _rect(u: np.ndarray, v: np.ndarray, half_l: float, half_w: float) -> np.ndarray:
    inside: np.ndarray = (np.abs(u) <= half_l) & (np.abs(v) <= half_w)
    return inside


def _shade(p: _Placement, u: np.ndarray, v: np.ndarray,
           channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage mask and colour of an object at local coordinates (u along, v across)."""
    length, width = p.length, p.width
    inside = _rect(u, v, length / 2, width / 2)
    body = np.asarray(p.body[:channels], np.float32)
    accent = np.asarray(p.accent[:channels], np.float32)
    dark = np.asarray(_dark()[:channels], np.float32)
    colour = np.broadcast_to(body, (*u.shape, channels)).copy()
    mark = np.zeros(u.shape, bool)
    kind = p.kind
    if kind == "outline":
        inside &= ~_rect(u, v, length / 2 - 1.5, width / 2 - 1.5)
    elif kind == "windshield":
        # Bright hood | dark windshield | bright roof | dark rear window: a bold pattern,
        # so a small detector can learn it quickly; uniform "patch" decoys lack it.
        mark = ((u >= 0.08 * length) & (u <= 0.34 * length) & (np.abs(v) <= 0.42 * width)) | (
            (u >= -0.44 * length) & (u <= -0.28 * length) & (np.abs(v) <= 0.40 * width))
    elif kind == "cab":
        # Coloured cab with a windshield, a dark gap, and a trailer with two roof rails.
        colour[u >= 0.28 * length] = accent
        rails = (u <= 0.18 * length) & (u >= -0.46 * length) & (
            np.abs(np.abs(v) - 0.26 * width) <= 0.06 * width + 0.3)
        colour[rails] = body + (dark - body) * 0.55
        mark = (((u >= 0.21 * length) & (u <= 0.28 * length))
                | ((u >= 0.38 * length) & (u <= 0.47 * length) & (np.abs(v) <= 0.42 * width)))
    elif kind == "plus":
        core = _rect(u, v, 0.36 * length, 0.36 * width)
        mark = core & ((np.abs(u) <= 0.8) | (np.abs(v) <= 0.8))
    elif kind == "windows":
        side = (np.abs(v) >= 0.2 * width) & (np.abs(v) <= 0.4 * width)
        panes = (u >= -0.42 * length) & (u <= 0.34 * length) & (np.mod(u, 3.0) < 1.8)
        front = (u >= 0.40 * length) & (u <= 0.47 * length) & (np.abs(v) <= 0.4 * width)
        mark = (side & panes) | front
    elif kind == "ring":
        radius = np.hypot(u, v)
        mark = (radius >= 0.18 * length) & (radius <= 0.31 * length)
    elif kind == "split":
        colour[u > 0] = accent
        mark = np.abs(u) <= 0.7
    elif kind == "dot":
        mark = np.hypot(u, v) <= 0.22 * min(length, width)
    elif kind == "bars":
        step = length / 6
        mark = (np.mod(u + length / 2, step) < 1.4) & (np.abs(u) <= 0.45 * length)
    # "patch" decoys stay uniform: the body without any marking.
    colour[mark] = dark
    return inside, colour


def _downsample(values: np.ndarray, factor: int) -> np.ndarray:
    h, w = values.shape[0] // factor, values.shape[1] // factor
    mean: np.ndarray = values.reshape(h, factor, w, factor, *values.shape[2:]).mean(axis=(1, 3))
    return mean


def _draw(img: np.ndarray, p: _Placement, row0: int, col0: int) -> None:
    """Composite one object (anti-aliased by supersampling) onto a block in place."""
    h, w, channels = img.shape
    minx, miny, maxx, maxy = p.footprint()
    x_lo, x_hi = max(col0, math.floor(minx)), min(col0 + w, math.ceil(maxx))
    y_lo, y_hi = max(row0, math.floor(miny)), min(row0 + h, math.ceil(maxy))
    if x_lo >= x_hi or y_lo >= y_hi:
        return
    s = _SUPERSAMPLE
    xs = x_lo + (np.arange((x_hi - x_lo) * s, dtype=np.float32) + 0.5) / s
    ys = y_lo + (np.arange((y_hi - y_lo) * s, dtype=np.float32) + 0.5) / s
    dx, dy = xs[None, :] - np.float32(p.cx), ys[:, None] - np.float32(p.cy)
    c, sn = np.float32(math.cos(p.angle)), np.float32(math.sin(p.angle))
    sub = img[y_lo - row0:y_hi - row0, x_lo - col0:x_hi - col0]
    u, v = dx * c + dy * sn, -dx * sn + dy * c
    if p.kind == "shadow":
        cover = _downsample(_rect(u, v, p.length / 2, p.width / 2).astype(np.float32), s)
        sub *= (1 - 0.55 * cover)[..., None]
        return
    if p.casts_shadow:
        su = (dx - _SUN[0]) * c + (dy - _SUN[1]) * sn
        sv = -(dx - _SUN[0]) * sn + (dy - _SUN[1]) * c
        cover = _downsample(_rect(su, sv, p.length / 2, p.width / 2).astype(np.float32), s)
        sub *= (1 - _SHADOW_DARKEN * cover)[..., None]
    inside, colour = _shade(p, u, v, channels)
    alpha = _downsample(inside.astype(np.float32), s)
    premultiplied = _downsample(colour * inside[..., None], s)
    sub *= (1 - alpha)[..., None]
    sub += premultiplied


def _render_block(spec: SceneSpec, placements: Sequence[_Placement], tree: Any,
                  salts: tuple[int, int, int], block_size: int, brow: int,
                  bcol: int) -> np.ndarray:
    """One block as a (bands, rows, cols) array of the scene's dtype."""
    row0, col0 = brow * block_size, bcol * block_size
    h = min(block_size, spec.height - row0)
    w = min(block_size, spec.width - col0)
    img = _background(spec, row0, col0, h, w, salts)
    for index in sorted(tree.query(box(col0, row0, col0 + w, row0 + h)).tolist()):
        _draw(img, placements[index], row0, col0)
    rng = np.random.default_rng([spec.seed, _TAG_NOISE, brow, bcol])
    # Sensor noise: mostly brightness, a little per channel. In place: blocks stay small.
    noise = rng.standard_normal((h, w, 1), dtype=np.float32)
    noise *= np.float32(0.012)
    img += noise
    noise = rng.standard_normal((h, w, spec.bands), dtype=np.float32)
    noise *= np.float32(0.006)
    img += noise
    del noise
    top = 255 if spec.dtype == "uint8" else 4095
    img *= np.float32(top)
    np.rint(img, out=img)
    np.clip(img, 1, top, out=img)
    out = img.astype(spec.dtype)
    del img
    b = spec.nodata_border
    if b:
        rows = np.arange(row0, row0 + h)
        cols = np.arange(col0, col0 + w)
        invalid = ((rows < b) | (rows >= spec.height - b))[:, None] | (
            (cols < b) | (cols >= spec.width - b))[None, :]
        out[invalid] = 0
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _block_size(spec: SceneSpec) -> int:
    # TIFF tiles must be multiples of 16; small scenes get one tile instead of a mostly empty one.
    return min(_BLOCK, 16 * math.ceil(max(spec.width, spec.height) / 16))


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
    planned = _plan(spec)
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
    salts = _salts(spec.seed)
    try:
        # A small block cache: each block is written once, so caching only costs memory.
        with atomic_path(path) as temporary, rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES), \
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
                    data = _render_block(spec, placements, tree, salts, block, brow, bcol)
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
        _plan(spec)
    scenes = []
    for spec in specs:
        scene = write_scene(drop_dir / f"{spec.scene_id}.tif", spec, progress=progress)
        geojson = write_annotations(drop_dir / f"{spec.scene_id}.geojson", scene,
                                    to_epsg=annotations_epsg)
        scenes.append(replace(scene, annotations_path=geojson))
    return scenes
