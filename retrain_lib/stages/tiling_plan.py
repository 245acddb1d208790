"""The plan of a shard: per tile, its labels, masked partial objects and AOI region, all
decided before any pixel is read; and the grouping of tiles into work units."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from retrain_lib.geo.annotations import Annotations
from retrain_lib.geo.windows import PixelWindow
from retrain_lib.stages.tiling_workers import RunTask, TileTask

__all__ = ["TilePlan", "background_order", "plan_tiles", "tile_id", "work_chunks"]

MAX_RUN_TILES = 8  # tiles per horizontal read ...
CHUNK_TILE_ROWS = 4  # ... and grid rows per work unit (see work_chunks)


def tile_id(scene_id: str, window: PixelWindow) -> str:
    """A chip's id: the scene id and the window, e.g. ``s1_x0_y512_w640_h640``."""
    return (f"{scene_id}_x{window.col_off}_y{window.row_off}"
            f"_w{window.width}_h{window.height}")



@dataclass
class TilePlan:
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


def plan_tiles(windows: list[PixelWindow], scene_id: str, objects: Annotations,
               classes: Sequence[str], aoi_px: shapely.Geometry | None,
               min_visibility: float) -> TilePlan:
    """Labels, masks and AOI regions of every window (see the tiling module's policies)."""
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
    return TilePlan(
        windows=windows,
        tile_ids=[tile_id(scene_id, w) for w in windows],
        in_aoi=in_aoi,
        region_wkb=region_wkb,
        label_text=["".join(f"{line}\n" for line in lines) for lines in label_lines],
        objects=counts,
        object_sets=[np.array(s, dtype=int) for s in labelled],
        mask_rings=[tuple(r) for r in rings],
        partial=partial,
    )


def work_chunks(plan: TilePlan, indexes: Sequence[int]) -> list[tuple[RunTask, ...]]:
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
                    runs.append(run_task(plan, tiles[start:end]))
                    start = end
        chunks.append(tuple(runs))
    return chunks


def run_task(plan: TilePlan, tiles: Sequence[int]) -> RunTask:
    """One read of neighbouring tiles of a row, as a worker's task."""
    first, last = plan.windows[tiles[0]], plan.windows[tiles[-1]]
    union = PixelWindow.from_bounds(first.col_off, first.row_off, last.col_off + last.width,
                                    first.row_off + first.height)
    return RunTask(union, tuple(
        TileTask(i, plan.tile_ids[i], plan.windows[i], plan.label_text[i],
                  plan.mask_rings[i], plan.region_wkb[i]) for i in tiles))


def background_order(candidates: np.ndarray, seed: int, scene_id: str) -> np.ndarray:
    """Background chips in a seeded order that depends on the scene id only."""
    scene_key = int.from_bytes(hashlib.sha256(scene_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, scene_key])
    return candidates[rng.permutation(len(candidates))]


