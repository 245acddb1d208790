"""What a synthetic scene holds: its spec, the look of each class and region, and where every
object and decoy goes (see :mod:`retrain_lib.devtools.synthetic` for the whole picture)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from shapely.geometry import Polygon

from retrain_lib.core.errors import ConfigError

__all__ = [
    "BLOCK_PX",
    "DARK",
    "MAX_CLASSES",
    "REGIONS",
    "SHADOW_DARKEN",
    "SUN",
    "SUPERSAMPLE",
    "TAG_NOISE",
    "TAG_TEXTURE",
    "Placement",
    "SceneSpec",
    "SyntheticObject",
    "SyntheticScene",
    "plan_objects",
    "plan_placements",
    "scene_transform",
]

Region = Literal["vegetated", "arid"]
RGB = tuple[float, float, float]

_SCENE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MIN_SIZE = 64
_MAX_SIZE = 200_000
BLOCK_PX = 512
_GDAL_CACHE_BYTES = 16 * 2**20  # rasterio takes an integer GDAL_CACHEMAX in bytes
# Shadow offset (columns, rows) in pixels and how much it darkens: the sun is to the upper left.
SUN = (2.0, 1.5)
SHADOW_DARKEN = 0.5
SUPERSAMPLE = 3
_MARGIN_PX = 3.0
DARK: RGB = (0.06, 0.07, 0.09)
_SIZE_JITTER = 0.08

# Random streams, kept apart so adding draws to one never shifts another.
TAG_PLAN, TAG_NOISE, TAG_TEXTURE = 1, 2, 3


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
class RegionLook:
    base: RGB
    light: RGB
    patch: RGB  # tree canopy (vegetated) or gravel (arid)
    nir: tuple[float, float, float]  # base, light, patch
    patch_threshold: float
    fine_amplitude: float
    dust: float  # how far object colours are pulled toward ``base``


REGIONS: dict[str, RegionLook] = {
    "vegetated": RegionLook((0.22, 0.33, 0.15), (0.40, 0.49, 0.25), (0.10, 0.19, 0.09),
                         (0.55, 0.68, 0.62), 0.60, 0.07, 0.0),
    "arid": RegionLook((0.74, 0.64, 0.48), (0.84, 0.76, 0.61), (0.58, 0.50, 0.39),
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
        if self.region not in REGIONS:
            raise ConfigError(f"{where}: region: got {self.region!r}; expected one of "
                              f"{', '.join(REGIONS)}")
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
class Placement:
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
        hx, hy = half_extent(self.length, self.width, self.angle)
        return (self.cx - hx - 1, self.cy - hy - 1,
                self.cx + hx + SUN[0] + 1, self.cy + hy + SUN[1] + 1)


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


def half_extent(length: float, width: float, angle: float) -> tuple[float, float]:
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


def _object_colour(rgb: RGB, region: RegionLook, rng: np.random.Generator) -> tuple[float, ...]:
    """Jittered colour as (R, G, B, NIR); painted metal is about as bright in NIR as in RGB."""
    gain = rng.uniform(0.9, 1.05)
    colour = [min(1.0, c * gain) for c in rgb]
    colour = [c + (b - c) * region.dust for c, b in zip(colour, region.base, strict=True)]
    return (*colour, 0.8 * sum(colour) / 3 + 0.05)


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


def plan_placements(spec: SceneSpec) -> list[tuple[SyntheticObject, Placement]]:
    """Place every object and decoy: one per grid cell, so nothing overlaps."""
    from shapely import affinity

    rng = np.random.default_rng([spec.seed, TAG_PLAN])
    region = REGIONS[spec.region]
    styles = _CLASS_STYLES[: len(spec.classes)]
    grow = 1 + _SIZE_JITTER
    diagonal = max(math.hypot(s.length * grow, s.width * grow) for s in styles)
    cell = math.ceil(diagonal + 2 * max(SUN) + 2 * _MARGIN_PX)
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
    planned: list[tuple[SyntheticObject, Placement]] = []
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
        hx, hy = half_extent(length, width, angle)
        col, row = int(cell_index) % nx, int(cell_index) // nx
        x_lo, y_lo = border + col * cell, border + row * cell
        cx = rng.uniform(x_lo + _MARGIN_PX + hx, x_lo + cell - _MARGIN_PX - SUN[0] - hx)
        cy = rng.uniform(y_lo + _MARGIN_PX + hy, y_lo + cell - _MARGIN_PX - SUN[1] - hy)
        placement = Placement(kind, cx, cy, length, width, angle, body, accent,
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
    return tuple(obj for obj, _ in plan_placements(spec))



