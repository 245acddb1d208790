"""Pixel windows: whole-pixel rectangles of a scene, and the tile grid that covers a scene."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine

from retrain_lib.core.errors import ConfigError
from retrain_lib.geo.crs import apply_affine

__all__ = ["PixelWindow", "tile_grid"]


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
        xy = apply_affine(transform, corners)
        return (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()),
                float(xy[:, 1].max()))


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


