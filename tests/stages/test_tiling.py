"""Tiling: grid, labels, radiometry, skipping, shards, bad input, memory."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.classes import ClassMapper
from retrain_lib.core.config import TilingConfig
from retrain_lib.core.errors import ConfigError, InputError
from retrain_lib.geo.crs import map_to_pixel, pixel_to_map, reproject_geometries
from retrain_lib.geo.geojson import Feature, write_geojson
from retrain_lib.geo.raster import Stretch, inspect_scene, read_chip, resolve_tile_px, scene_stretch
from retrain_lib.geo.windows import PixelWindow, tile_grid
from retrain_lib.stages.tiling import TilingResult, params_hash, tile_scene

UTM = "EPSG:32633"
GSD = 0.5
# An origin off the pixel grid of round numbers, so the round trip tests real arithmetic.
TRANSFORM = Affine(GSD, 0.0, 500000.3, 0.0, -GSD, 5000000.7)
CLASSES = ["car", "truck"]
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def pattern(band: int, rows: np.ndarray, cols: np.ndarray, dtype: str) -> np.ndarray:
    """Deterministic texture, never 0 (0 is the nodata value of the tests)."""
    values = (cols[None, :] * 7 + rows[:, None] * 3 + band * 50) % 251 + 1
    return (values * 16).astype(dtype) if dtype == "uint16" else values.astype(dtype)


def write_raster(path: Path, width: int, height: int, *, count: int = 3, dtype: str = "uint8",
                 crs: str | None = UTM, transform: Affine | None = TRANSFORM,
                 nodata: float | None = None,
                 nodata_where: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                 block: int = 128) -> Path:
    """A tiled GeoTIFF, written strip by strip so big test scenes stay cheap."""
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": dtype, "tiled": True, "blockxsize": block, "blockysize": block}
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dataset:
        for row0 in range(0, height, block):
            rows = np.arange(row0, min(row0 + block, height))
            cols = np.arange(width)
            data = np.stack([pattern(b, rows, cols, dtype) for b in range(count)])
            if nodata_where is not None:
                where = nodata_where(rows[:, None], cols[None, :])
                data[:, np.broadcast_to(where, data.shape[1:])] = 0
            dataset.write(data, window=PixelWindow(0, row0, width, len(rows)).to_rasterio())
    return path


def px_box(col0: float, row0: float, col1: float, row1: float) -> shapely.Polygon:
    """A box given in scene pixels, as a polygon in map coordinates."""
    return pixel_to_map(shapely.box(col0, row0, col1, row1), TRANSFORM)


def write_labels(path: Path, geoms: Sequence[shapely.Geometry], classes: Sequence[str],
                 crs: str = UTM) -> Path:
    write_geojson(path, [Feature(g, {"class": c}, id=f"obj{i}", index=i)
                         for i, (g, c) in enumerate(zip(geoms, classes, strict=True))], crs)
    return path


def read_labels(shard: Path) -> dict[str, list[tuple[int, float, float, float, float]]]:
    out = {}
    for path in sorted((shard / "labels").glob("*.txt")):
        lines = path.read_text(encoding="utf-8").split("\n")
        rows = [line.split() for line in lines if line]
        out[path.stem] = [(int(r[0]), *map(float, r[1:])) for r in rows]
    return out


def read_index(result: TilingResult) -> dict:
    return json.loads(result.index_path.read_text(encoding="utf-8"))


def read_png(shard: Path, tile_id: str) -> np.ndarray:
    return cv2.imread(str(shard / "images" / f"{tile_id}.png"))[:, :, ::-1]


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int, min_px: float,
                 max_px: float) -> list[tuple[float, float, float, float]]:
    boxes = []
    for _ in range(n):
        w, h = rng.uniform(min_px, max_px, size=2)
        c, r = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append((c, r, c + w, r + h))
    return boxes


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    return write_raster(tmp_path / "scene.tif", 600, 520)


# --------------------------------------------------------------------------- grid


def test_tile_grid_covers_every_pixel_edges_included() -> None:
    rng = np.random.default_rng(1)
    cases = [(640, 640, 640, 128), (641, 639, 640, 128), (100, 50, 640, 128),
             (1000, 1000, 256, 0), (300, 200, 64, 63)]
    cases += [(int(w), int(h), int(t), int(t * f)) for w, h, t, f in zip(
        rng.integers(1, 700, 150), rng.integers(1, 700, 150), rng.integers(16, 300, 150),
        rng.uniform(0, 0.6, 150), strict=True)]
    for width, height, tile, overlap in cases:
        windows = tile_grid(width, height, tile, overlap)
        coverage = np.zeros((height, width), dtype=np.int32)
        for window in windows:
            col0, row0, col1, row1 = window.bounds
            assert min(col0, row0) >= 0 and col1 <= width and row1 <= height
            assert (window.width, window.height) == (min(tile, width), min(tile, height))
            coverage[window.slices] += 1
        assert coverage.min() >= 1, (width, height, tile, overlap)
        starts = sorted({w.col_off for w in windows})
        assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_objects_up_to_the_overlap_lie_wholly_in_a_tile_and_the_bound_is_tight() -> None:
    rng = np.random.default_rng(2)
    width, height, tile, overlap = 1500, 1100, 256, 51
    windows = tile_grid(width, height, tile, overlap)
    for c0, r0, c1, r1 in random_boxes(rng, 2000, width, height, 1, overlap):
        assert any(w.col_off <= c0 and c1 <= w.col_off + w.width and w.row_off <= r0
                   and r1 <= w.row_off + w.height for w in windows), (c0, r0, c1, r1)
    # One pixel more than the overlap, placed across a seam, fits in no tile: the guarantee
    # is "extent <= overlap", which is what docs/tiling.md promises.
    c0 = tile - overlap - 0.5  # from just before the 2nd tile's start to just past the 1st's end
    assert not any(w.col_off <= c0 and c0 + overlap + 1 <= w.col_off + w.width
                   for w in windows)


def test_tile_sizes_in_metres_follow_the_gsd(tmp_path: Path) -> None:
    fine = inspect_scene(write_raster(tmp_path / "fine.tif", 64, 64))
    coarse = inspect_scene(write_raster(
        tmp_path / "coarse.tif", 64, 64, transform=Affine(2.0, 0, 500000, 0, -2.0, 5000000)))
    params = TilingConfig(tile_size_m=100, overlap=0.25)
    assert resolve_tile_px(params, fine) == (200, 50)
    assert resolve_tile_px(params, coarse) == (50, 12)
    assert resolve_tile_px(TilingConfig(tile_size=256, overlap=40), fine) == (256, 40)
    with pytest.raises(ConfigError, match=r"expected 32\.\.4096 px"):
        resolve_tile_px(TilingConfig(tile_size_m=10), coarse)
    with pytest.raises(ConfigError, match="not less than the tile"):
        resolve_tile_px(TilingConfig(tile_size=64, overlap=64), fine)


# --------------------------------------------------------------------------- labels


@pytest.fixture()
def small_objects(tmp_path: Path, scene: Path) -> tuple[list[tuple], Path]:
    boxes = random_boxes(np.random.default_rng(3), 40, 600, 520, 4, 32)
    labels = write_labels(tmp_path / "labels.geojson", [px_box(*b) for b in boxes],
                          [CLASSES[i % 2] for i in range(len(boxes))])
    return boxes, labels


def _labels_in_scene_px(result: TilingResult) -> list[tuple[int, np.ndarray]]:
    index = read_index(result)
    windows = {t["id"]: t["window"] for t in index["tiles"]}
    found = []
    for tile_id, lines in read_labels(result.shard_dir).items():
        col, row, width, height = windows[tile_id]
        for cls, cx, cy, w, h in lines:
            found.append((cls, np.array([col + (cx - w / 2) * width, row + (cy - h / 2) * height,
                                         col + (cx + w / 2) * width,
                                         row + (cy + h / 2) * height])))
    return found


def test_objects_smaller_than_the_overlap_are_labelled_whole_in_some_chip(
        tmp_path: Path, scene: Path, small_objects: tuple[list[tuple], Path]) -> None:
    boxes, labels = small_objects
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                        TilingConfig(tile_size=128, overlap=32, background_ratio=0), workers=1)
    assert (result.tile_px, result.overlap_px) == (128, 32)
    found = _labels_in_scene_px(result)
    for i, box in enumerate(boxes):
        assert any(cls == i % 2 and np.allclose(b, box, atol=0.01) for cls, b in found), box
    assert result.objects_per_class == {"car": 20, "truck": 20}


def test_label_round_trip_pixel_map_pixel_within_half_a_pixel(
        tmp_path: Path, scene: Path, small_objects: tuple[list[tuple], Path]) -> None:
    boxes, labels = small_objects
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                        TilingConfig(tile_size=128, overlap=32, background_ratio=0), workers=1)
    transform = Affine(*read_index(result)["scene"]["transform"])
    originals = [px_box(*b) for b in boxes]  # what analysts drew, in map units
    for _, found in _labels_in_scene_px(result):
        in_map = pixel_to_map(shapely.box(*found), transform)
        nearest = min(originals, key=lambda g: g.centroid.distance(in_map.centroid))
        visible = nearest.intersection(in_map)  # a clipped label covers part of the object
        error_px = np.abs(np.subtract(map_to_pixel(visible, transform).bounds,
                                      map_to_pixel(in_map, transform).bounds))
        assert error_px.max() <= 0.5


def test_epsg4326_labels_on_a_utm_scene_match_utm_labels(
        tmp_path: Path, scene: Path, small_objects: tuple[list[tuple], Path]) -> None:
    boxes, utm_labels = small_objects
    lonlat = reproject_geometries(np.array([px_box(*b) for b in boxes], dtype=object), UTM,
                                  "EPSG:4326")
    wgs84_labels = write_labels(tmp_path / "wgs84.geojson", list(lonlat),
                                [CLASSES[i % 2] for i in range(len(boxes))], "EPSG:4326")
    assert '"crs"' not in wgs84_labels.read_text(encoding="utf-8")  # plain RFC 7946
    params = TilingConfig(tile_size=128, overlap=32, background_ratio=0)
    a = tile_scene(scene, utm_labels, CLASSES, tmp_path / "a", params, workers=1)
    b = tile_scene(scene, wgs84_labels, CLASSES, tmp_path / "b", params, workers=1)
    labels_a, labels_b = read_labels(a.shard_dir), read_labels(b.shard_dir)
    assert labels_a.keys() == labels_b.keys() and labels_a
    for tile_id, lines in labels_a.items():
        assert np.allclose(np.array(lines), np.array(labels_b[tile_id]), atol=1e-4)


def test_partially_visible_objects_are_masked_and_recorded(tmp_path: Path) -> None:
    scene = write_raster(tmp_path / "scene.tif", 256, 128)
    # 20 px wide across the seam at col 128: 8 px (0.4) in the left tile, 12 px in the right.
    labels = write_labels(tmp_path / "l.geojson", [px_box(120, 50, 140, 60)], ["truck"])
    params = TilingConfig(tile_size=128, overlap=0, image_format="png", background_ratio=1)
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, workers=1)
    tiles = {t["window"][0]: t for t in read_index(result)["tiles"]}
    left, right = tiles[0], tiles[128]
    assert left["partial_objects"] == [{"class": "truck", "feature": 0, "visible_fraction": 0.4}]
    assert left["objects"] == {} and right["objects"] == {"truck": 1}
    assert read_labels(result.shard_dir)[right["id"]] == [
        (1, *(pytest.approx(v / 128, abs=1e-6) for v in (6, 55, 12, 10)))]
    chip = read_png(result.shard_dir, left["id"])
    assert (chip[50:60, 120:128] == 0).all()  # the sliver is blacked out ...
    assert chip[40:50, 110:120].min() > 0  # ... and nothing else
    assert result.partial_objects == 1 and result.background_tiles == 1


# --------------------------------------------------------------------------- skipping


def test_nodata_tiles_are_skipped(tmp_path: Path) -> None:
    scene = write_raster(tmp_path / "scene.tif", 512, 256, nodata=0,
                         nodata_where=lambda rows, cols: cols < 180)
    labels = write_labels(tmp_path / "l.geojson", [px_box(60, 60, 70, 70),
                                                   px_box(400, 60, 410, 70)], ["car", "car"])
    params = TilingConfig(tile_size=128, overlap=0, max_nodata_fraction=0.5,
                          background_ratio=100, image_format="png")
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, workers=1)
    for tile in read_index(result)["tiles"]:
        col = tile["window"][0]
        expected = min(max(180 - col, 0), 128) / 128
        assert tile["nodata_fraction"] == pytest.approx(expected, abs=1e-4)
        assert tile["status"] == ("nodata" if expected > 0.5 else "written")
        if col == 128:  # 52 nodata columns (41%): kept, and they are black
            chip = read_png(result.shard_dir, tile["id"])
            assert (chip[:, :52] == 0).all() and chip[:, 52:].min() > 0
    assert result.skipped["nodata"] == 2  # the tiles at column 0, in both rows
    assert result.objects_per_class == {"car": 1, "truck": 0}


def test_alpha_band_marks_nodata(tmp_path: Path) -> None:
    scene = tmp_path / "rgba.tif"
    data = np.full((4, 128, 256), 120, dtype=np.uint8)
    data[3] = 255
    data[3, :, :100] = 0  # transparent: the left 100 columns
    with rasterio.open(scene, "w", driver="GTiff", width=256, height=128, count=4,
                       dtype="uint8", crs=UTM, transform=TRANSFORM, photometric="RGB",
                       alpha="YES") as dataset:
        dataset.write(data)
    with rasterio.open(scene) as dataset:
        chip = read_chip(dataset, PixelWindow(0, 0, 128, 128), scene_stretch(dataset))
    assert chip.nodata_fraction == pytest.approx(100 / 128)
    assert (chip.rgb[:, :100] == 0).all() and (chip.rgb[:, 100:] == 120).all()
    assert chip.valid is not None and chip.valid[:, 100:].all()


def test_aoi_skips_tiles_and_masks_outside_pixels(tmp_path: Path, scene: Path) -> None:
    inside, outside = px_box(20, 20, 30, 30), px_box(500, 400, 510, 410)
    labels = write_labels(tmp_path / "l.geojson", [inside, outside], ["car", "truck"])
    aoi_map = px_box(0, 0, 200, 150)
    aoi = write_labels(tmp_path / "aoi.geojson", list(reproject_geometries(
        np.array([aoi_map], dtype=object), UTM, "EPSG:4326")), ["aoi"], "EPSG:4326")
    params = TilingConfig(tile_size=128, overlap=0, background_ratio=100,
                          max_nodata_fraction=0.9, image_format="png")
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, aoi=aoi, workers=1)
    tiles = {tuple(t["window"][:2]): t for t in read_index(result)["tiles"]}
    assert {k for k, t in tiles.items() if t["status"] != "outside_aoi"} == {
        (0, 0), (128, 0), (0, 128), (128, 128)}
    assert result.objects_per_class == {"car": 1, "truck": 0}
    # Tile (128, 0) is inside the AOI up to column 200 (72 px) -> its other pixels are 0.
    cut = tiles[(128, 0)]
    assert cut["nodata_fraction"] == pytest.approx(1 - 72 / 128, abs=0.01)
    chip = read_png(result.shard_dir, cut["id"])
    assert (chip[:, 73:] == 0).all() and chip[:, :71].min() > 0


# --------------------------------------------------------------------------- radiometry


def test_uint16_four_band_scene_gets_one_stretch_for_all_chips(tmp_path: Path) -> None:
    scene = write_raster(tmp_path / "s16.tif", 400, 300, count=4, dtype="uint16")
    labels = write_labels(tmp_path / "l.geojson", [px_box(100, 100, 120, 110)], ["car"])
    params = TilingConfig(tile_size=128, overlap=32, image_format="png", background_ratio=100)
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, workers=1)
    index = read_index(result)
    stretch = Stretch.from_dict(index["stretch"])
    assert stretch.bands == (1, 2, 3) and not stretch.identity
    written = [t for t in index["tiles"] if t["status"] == "written"]
    assert len(written) == result.tiles_total
    chips = {t["id"]: read_png(result.shard_dir, t["id"]) for t in written}
    for chip in chips.values():
        assert chip.dtype == np.uint8 and chip.shape == (128, 128, 3)
        assert chip.min() == 0 and chip.max() == 255
    # One mapping for the whole scene: a scene pixel looks the same in every chip that has it,
    # and equals the documented stretch of the raw value.
    row, col = 100, 110
    raw = np.array([pattern(b, np.array([row]), np.array([col]), "uint16")[0, 0]
                    for b in range(3)], dtype=np.float64)
    expected = np.clip(np.round((raw - np.array(stretch.low)) * 255
                                / (np.array(stretch.high) - np.array(stretch.low))), 0, 255)
    seen = [chips[t["id"]][row - t["window"][1], col - t["window"][0]] for t in written
            if PixelWindow(*t["window"]).intersection(PixelWindow(col, row, 1, 1))]
    assert len(seen) >= 2
    assert all(np.array_equal(s, expected) for s in seen)
    with rasterio.open(scene) as dataset:
        grey = read_chip(dataset, PixelWindow(0, 0, 64, 64),
                         scene_stretch(dataset, [4], (2.0, 98.0)))
    assert grey.rgb.shape == (64, 64, 3) and grey.valid is None
    assert np.array_equal(grey.rgb[..., 0], grey.rgb[..., 2])


def test_uint8_scenes_pass_through_unchanged(tmp_path: Path, scene: Path) -> None:
    with rasterio.open(scene) as dataset:
        stretch = scene_stretch(dataset)
        chip = read_chip(dataset, PixelWindow(10, 20, 30, 40), stretch)
        raw = dataset.read(window=PixelWindow(10, 20, 30, 40).to_rasterio())
    assert stretch.identity and np.array_equal(chip.rgb, raw.transpose(1, 2, 0))


# --------------------------------------------------------------------------- background


def _one_object_per_column(tmp_path: Path, columns: Sequence[int]) -> Path:
    # Objects inside the non-overlapping middle of tiles (tile 100, overlap 0 below).
    return write_labels(tmp_path / "l.geojson", [px_box(c + 40, 40, c + 50, 50) for c in columns],
                        ["car"] * len(columns))


@pytest.mark.parametrize(("ratio", "expected"), [(0, 0), (0.5, 2), (1.5, 6)])
def test_background_ratio(tmp_path: Path, ratio: float, expected: int) -> None:
    scene = write_raster(tmp_path / "s.tif", 1000, 300)
    labels = _one_object_per_column(tmp_path, [0, 200, 400, 600])
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                        TilingConfig(tile_size=100, overlap=0, background_ratio=ratio),
                        workers=1)
    assert result.positive_tiles == 4
    assert result.background_tiles == expected
    assert result.skipped["background_cap"] == 30 - 4 - expected


@pytest.mark.parametrize(("nodata_cols", "ratio"), [(100, 2), (500, 3)])
def test_background_quota_is_exact_when_nodata_skips_tiles(tmp_path: Path, nodata_cols: int,
                                                           ratio: int) -> None:
    # One of the two positive tiles is nodata, so the first draw of background tiles (sized
    # for two positives) is too large: extra chips are dropped (few nodata tiles) or, when
    # many drawn tiles are nodata themselves, replaced by the next in seeded order.
    scene = write_raster(tmp_path / "s.tif", 1000, 300, nodata=0,
                         nodata_where=lambda rows, cols: cols < nodata_cols)
    labels = _one_object_per_column(tmp_path, [0, 600])
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                        TilingConfig(tile_size=100, overlap=0, background_ratio=ratio),
                        workers=1)
    assert (result.positive_tiles, result.background_tiles) == (1, ratio)
    tiles = read_index(result)["tiles"]
    written = [t for t in tiles if t["status"] == "written"]
    assert len(written) == 1 + ratio and all(t["nodata_fraction"] == 0 for t in written)
    assert sorted(p.stem for p in (result.shard_dir / "images").iterdir()) == sorted(
        t["id"] for t in written)
    assert result.skipped["nodata"] == sum(t["nodata_fraction"] is not None
                                           and t["nodata_fraction"] > 0.5 for t in tiles)


def test_background_sample_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    scene = write_raster(tmp_path / "s.tif", 1000, 300)
    labels = _one_object_per_column(tmp_path, [0, 200, 400, 600])

    def chosen(seed: int, out: str) -> set[str]:
        result = tile_scene(scene, labels, CLASSES, tmp_path / out,
                            TilingConfig(tile_size=100, overlap=0, background_ratio=1,
                                         seed=seed), workers=1)
        return {t["id"] for t in read_index(result)["tiles"]
                if t["status"] == "written" and t["is_background"]}

    first = chosen(0, "a")
    assert len(first) == 4
    assert chosen(0, "b") == first
    assert chosen(1, "c") != first


# --------------------------------------------------------------------------- shards


def test_rerun_with_same_inputs_does_no_work(tmp_path: Path, scene: Path,
                                             small_objects: tuple[list[tuple], Path]) -> None:
    _, labels = small_objects
    params = TilingConfig(tile_size=128, overlap=32)
    first = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in first.shard_dir.rglob("*")}
    again = tile_scene(scene, labels, CLASSES, tmp_path / "out", params.model_copy(
        update={"workers": 3}), workers=1)
    assert again.reused and not first.reused
    assert again.shard_dir == first.shard_dir and again.tiles_written == first.tiles_written
    assert {p: p.stat().st_mtime_ns for p in first.shard_dir.rglob("*")} == stamps
    assert first.shard_dir == tmp_path / "out" / params_hash(params, CLASSES) / "scene"
    # Changed parameters make a new shard; changed annotations rebuild this one.
    other = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                       TilingConfig(tile_size=128, overlap=16), workers=1)
    assert other.params_hash != first.params_hash and not other.reused
    write_labels(labels, [px_box(5, 5, 15, 15)], ["car"])
    rebuilt = tile_scene(scene, labels, CLASSES, tmp_path / "out", params, workers=1)
    assert not rebuilt.reused and rebuilt.objects_per_class == {"car": 1, "truck": 0}
    assert sorted(p.name for p in first.shard_dir.parent.iterdir()) == ["params.json", "scene"]


def test_parallel_workers_write_the_same_shard(tmp_path: Path, scene: Path,
                                               small_objects: tuple[list[tuple], Path]) -> None:
    _, labels = small_objects
    params = TilingConfig(tile_size=96, overlap=16, background_ratio=0.5)
    one = tile_scene(scene, labels, CLASSES, tmp_path / "one", params, workers=1)
    two = tile_scene(scene, labels, CLASSES, tmp_path / "two", params, workers=2)

    def content(result: TilingResult) -> dict[str, bytes]:
        return {str(p.relative_to(result.shard_dir)): p.read_bytes()
                for p in result.shard_dir.rglob("*") if p.is_file() and p.name != "index.json"}

    assert content(one) == content(two)
    assert read_index(one)["tiles"] == read_index(two)["tiles"]
    tile_ids = [t["id"] for t in read_index(one)["tiles"]]
    assert tile_ids[0] == "scene_x0_y0_w96_h96" and len(set(tile_ids)) == len(tile_ids)


# --------------------------------------------------------------------------- bad input


def _no_complete_shard_left(out: Path) -> None:
    assert not list(out.rglob("index.json"))
    assert not [p for p in out.rglob(".tmp-*")]


def test_corrupt_raster_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))
    labels = write_labels(tmp_path / "l.geojson", [], [])
    with pytest.raises(InputError, match=r"bad\.tif: cannot open as a raster"):
        tile_scene(bad, labels, CLASSES, tmp_path / "out")
    with pytest.raises(InputError, match=r"missing\.tif: scene file not found"):
        tile_scene(tmp_path / "missing.tif", labels, CLASSES, tmp_path / "out")


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_raster_fails_without_a_complete_looking_shard(tmp_path: Path,
                                                                 workers: int) -> None:
    scene = write_raster(tmp_path / "cut.tif", 512, 512)
    labels = write_labels(tmp_path / "l.geojson", [px_box(c + 10, r + 10, c + 20, r + 20)
                                                   for c in range(0, 512, 128)
                                                   for r in range(0, 512, 128)], ["car"] * 16)
    with scene.open("r+b") as handle:
        handle.truncate(scene.stat().st_size // 2)
    with pytest.raises(InputError, match=r"cut\.tif: cannot read pixels .* corrupt or truncated"):
        tile_scene(scene, labels, CLASSES, tmp_path / "out",
                   TilingConfig(tile_size=128, overlap=0), workers=workers)
    _no_complete_shard_left(tmp_path / "out")


def test_raster_without_crs_or_geotransform(tmp_path: Path) -> None:
    no_crs = write_raster(tmp_path / "nocrs.tif", 64, 64, crs=None)
    with pytest.raises(InputError, match=r"nocrs\.tif: the raster has no CRS"):
        tile_scene(no_crs, None, CLASSES, tmp_path / "out")
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        no_transform = write_raster(tmp_path / "nogt.tif", 64, 64, transform=None)
    with pytest.raises(InputError, match=r"nogt\.tif: the raster has no geotransform"):
        inspect_scene(no_transform)


def test_annotations_wholly_outside_the_scene(tmp_path: Path, scene: Path) -> None:
    far = [shapely.box(600000, 4000000, 600010, 4000010)]
    labels = write_labels(tmp_path / "far.geojson", far, ["car"])
    with pytest.raises(InputError, match=r"far\.geojson: none of its 1 annotations overlaps"):
        tile_scene(scene, labels, CLASSES, tmp_path / "out")
    _no_complete_shard_left(tmp_path / "out")


def test_invalid_geometry_is_repaired_and_non_polygons_rejected(tmp_path: Path,
                                                               scene: Path) -> None:
    c0, r0 = TRANSFORM @ (100, 100)
    c1, r1 = TRANSFORM @ (120, 120)
    bowtie = shapely.Polygon([(c0, r0), (c1, r1), (c1, r0), (c0, r1)])
    point = shapely.Point(*(TRANSFORM @ (300, 300)))
    labels = write_labels(tmp_path / "l.geojson", [bowtie, point, px_box(10, 10, 20, 20)],
                          ["car", "car", "truck"])
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out",
                        TilingConfig(tile_size=128, overlap=0), workers=1)
    assert result.objects_per_class == {"car": 1, "truck": 1}
    assert len(result.notes) == 1 and result.notes[0].startswith("feature 0 (id 'obj0'): "
                                                                 "invalid geometry")
    assert "repaired with make_valid" in result.notes[0]
    assert result.rejected_features == ("feature 1 (id 'obj1'): Point is not polygonal; "
                                        "expected Polygon or MultiPolygon (feature ignored)",)


def test_unknown_class_names_the_file_and_features(tmp_path: Path, scene: Path) -> None:
    labels = write_labels(tmp_path / "l.geojson", [px_box(1, 1, 9, 9), px_box(20, 20, 30, 30)],
                          ["Car", "bus"])
    with pytest.raises(InputError, match=r"l\.geojson: unknown class 'bus' in feature 1 "
                                         r"\(id 'obj1'\); expected one of: car, truck"):
        tile_scene(scene, labels, CLASSES, tmp_path / "out")
    mapper = ClassMapper(tuple(CLASSES), {"bus": "truck"})
    result = tile_scene(scene, labels, CLASSES, tmp_path / "out", TilingConfig(tile_size=128),
                        class_mapper=mapper, workers=1)
    assert result.objects_per_class == {"car": 1, "truck": 1}


def test_empty_annotation_file_is_a_scene_without_objects(tmp_path: Path, scene: Path) -> None:
    empty = tmp_path / "empty.geojson"
    empty.write_text("", encoding="utf-8")
    result = tile_scene(scene, empty, CLASSES, tmp_path / "out", TilingConfig(tile_size=128),
                        workers=1)
    assert result.objects_per_class == {"car": 0, "truck": 0}
    assert result.tiles_written == 0 and result.skipped["background_cap"] == result.tiles_total
    assert result.index_path.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_tiles_and_prints_a_summary(tmp_path: Path, scene: Path,
                                        small_objects: tuple[list[tuple], Path]) -> None:
    _, labels = small_objects
    result = CliRunner().invoke(app, [
        "tile", str(scene), "--labels", str(labels), "--classes", "car,truck",
        "--out", str(tmp_path / "out"), "--tile-size", "128", "--overlap", "0.25",
        "--format", "png", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "MP/s" in result.output
    assert list((tmp_path / "out").glob("*/scene/images/*.png"))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, scene: Path) -> None:
    labels = write_labels(tmp_path / "l.geojson", [px_box(1, 1, 9, 9)], ["bus"])
    result = CliRunner().invoke(app, [
        "tile", str(scene), "--labels", str(labels), "--classes", "car,truck",
        "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and "unknown class 'bus'" in result.output


# --------------------------------------------------------------------------- memory


def _peak_rss_growth_mb(tmp_path: Path, size: int) -> float:
    """Tile a size x size 3-band scene in a fresh process; peak RSS growth over its imports."""
    scene = write_raster(tmp_path / f"scene{size}.tif", size, size, block=256)
    labels = write_labels(tmp_path / f"labels{size}.geojson",
                          [px_box(c, r, c + 20, r + 10) for c in range(50, size, 900)
                           for r in range(50, size, 900)], ["car"] * len(range(50, size, 900))**2)
    out = tmp_path / f"out{size}"
    script = textwrap.dedent(f"""
        import json
        from retrain_lib.core.config import TilingConfig
        from retrain_lib.stages.tiling import tile_scene

        def peak_kb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status
                            if line.startswith("VmHWM"))

        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM) to the current RSS
        base = peak_kb()
        result = tile_scene({str(scene)!r}, {str(labels)!r}, ["car"], {str(out)!r},
                            TilingConfig(background_ratio=1e6), workers=1)
        print(json.dumps({{"growth_kb": peak_kb() - base, "written": result.tiles_written}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    assert usage["written"] == len(tile_grid(size, size, 640, 128))  # every chip was made
    return usage["growth_kb"] / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_stays_flat_as_the_scene_grows(tmp_path: Path) -> None:
    # 48 MB and 192 MB of pixels: a reader that held the scene would grow by 144 MB more on
    # the larger one. Ours holds a few runs of chips plus GDAL's fixed block cache (64 MiB).
    small = _peak_rss_growth_mb(tmp_path, 4000)
    large = _peak_rss_growth_mb(tmp_path, 8000)
    assert large < 150, f"tiling a 192 MB scene grew RSS by {large:.0f} MB"
    assert large - small < 40, f"RSS growth {small:.0f} MB -> {large:.0f} MB for 4x the pixels"


# --------------------------------------------------------------------------- scenes on S3


@pytest.fixture()
def s3_scene(tmp_path: Path, s3_endpoint: str) -> Iterator[tuple[Path, Path, str, Any]]:
    """A 1024 x 1024 scene and its labels locally, and the same scene in a bucket of the S3
    server, reached through a proxy that counts the bytes fetched and can be stopped: (local
    scene, labels, ``s3://`` URI of the scene, the proxy)."""
    from retrain_lib.core.storage import S3Settings, open_storage
    from tests.conftest import SocketProxy, new_bucket

    local = write_raster(tmp_path / "scene.tif", 1024, 1024, block=256)
    labels = write_labels(tmp_path / "labels.geojson",
                          [px_box(40, 40, 80, 90), px_box(700, 500, 760, 540)], CLASSES)
    proxy = SocketProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    settings = S3Settings(endpoint_url=proxy.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = new_bucket(settings, "scenes")
    storage = open_storage(f"s3://{bucket}/root", s3=settings)
    storage.put_file(local, "catalog/scene.tif")
    try:
        yield local, labels, storage.raster_path("catalog/scene.tif"), (proxy, settings)
    finally:
        proxy.stop()


def test_a_scene_on_s3_is_tiled_in_place_as_a_local_copy_would_be(
        tmp_path: Path, s3_scene: tuple[Path, Path, str, Any]) -> None:
    from retrain_lib.geo.raster import object_storage

    local, labels, remote, (proxy, settings) = s3_scene
    params = TilingConfig(tile_size=256, overlap=32, background_ratio=1.0)
    here = tile_scene(local, labels, CLASSES, tmp_path / "local", params, scene_id="s",
                      workers=1)
    proxy.bytes_to_client = 0
    with object_storage(settings):
        there = tile_scene(Path(remote), labels, CLASSES, tmp_path / "s3", params,
                           scene_id="s", workers=2)

    def content(result: TilingResult) -> dict[str, bytes]:
        return {str(p.relative_to(result.shard_dir)): p.read_bytes()
                for p in result.shard_dir.rglob("*") if p.is_file() and p.name != "index.json"}

    assert content(there) == content(here) and there.tiles_written == here.tiles_written > 0
    index = read_index(there)
    assert index["scene"]["path"].startswith("s3://scenes-")  # named as people know it
    assert set(index["source"]["scene"]) == {"size", "etag"}
    # Every pixel was needed here (background ratio 1): what was fetched is about the file,
    # never two copies of it.
    assert proxy.bytes_to_client < 1.3 * local.stat().st_size, proxy.bytes_to_client


def test_a_window_of_a_scene_on_s3_fetches_about_that_window(
        tmp_path: Path, s3_scene: tuple[Path, Path, str, Any]) -> None:
    from retrain_lib.geo.raster import object_storage

    local, labels, remote, (proxy, settings) = s3_scene
    proxy.bytes_to_client = 0
    with object_storage(settings):
        result = tile_scene(Path(remote), labels, CLASSES, tmp_path / "s3",
                            TilingConfig(tile_size=256, overlap=0), scene_id="s", workers=1,
                            windows=[PixelWindow(0, 0, 256, 256)])
    assert result.tiles_written == 1
    # One 256 px window of a 1024 px scene: a sixteenth of the pixels, plus the header.
    assert proxy.bytes_to_client < 0.25 * local.stat().st_size, proxy.bytes_to_client


def test_bad_s3_situations_name_the_bucket_and_key(
        tmp_path: Path, s3_scene: tuple[Path, Path, str, Any]) -> None:
    from retrain_lib.core.errors import StorageError
    from retrain_lib.geo.raster import object_storage

    _local, labels, remote, (proxy, settings) = s3_scene
    missing = remote.replace("scene.tif", "gone.tif")
    uri = "s3://" + missing[len("/vsis3/"):]
    with object_storage(settings), pytest.raises(InputError, match=f"^{uri}: scene object "
                                                 "not found$"):
        tile_scene(Path(missing), labels, CLASSES, tmp_path / "out", scene_id="s")
    # The server goes away in the middle of the pixels, then is gone: one error naming the
    # object and the endpoint each time, and no shard that looks complete.
    uri = "s3://" + remote[len("/vsis3/"):]
    proxy.bytes_to_client, proxy.stop_after_bytes = 0, 400_000
    with object_storage(settings), pytest.raises(
            StorageError, match=f"^{uri}: cannot read (pixels .* )?from {settings.endpoint_url}"):
        tile_scene(Path(remote), labels, CLASSES, tmp_path / "out", scene_id="s", workers=1,
                   params=TilingConfig(tile_size=256, overlap=0, background_ratio=1.0))
    _no_complete_shard_left(tmp_path / "out")
    proxy.stop()
    with object_storage(settings), pytest.raises(
            StorageError, match=f"^{uri}: cannot read.* {settings.endpoint_url}"):
        tile_scene(Path(remote), labels, CLASSES, tmp_path / "out", scene_id="s")
    _no_complete_shard_left(tmp_path / "out")


def test_denied_credentials_name_the_object(tmp_path: Path) -> None:
    """An S3 endpoint that refuses every request, as S3 does keys it does not accept."""
    import http.server
    import threading

    from retrain_lib.core.errors import StorageError
    from retrain_lib.core.storage import S3Settings
    from retrain_lib.geo.raster import object_storage

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _deny(self) -> None:
            body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                    b"<Message>Access Denied</Message></Error>")
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _deny

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{server.server_port}",
                          region_name="us-east-1", aws_access_key_id="wrong",
                          aws_secret_access_key="wrong")
    labels = write_labels(tmp_path / "l.geojson", [px_box(0, 0, 9, 9)], ["car"])
    try:
        with object_storage(settings), pytest.raises(
                StorageError, match=r"^s3://bucket/catalog/scene.tif: access denied"):
            tile_scene(Path("/vsis3/bucket/catalog/scene.tif"), labels, CLASSES,
                       tmp_path / "out", scene_id="s")
    finally:
        server.shutdown()
    _no_complete_shard_left(tmp_path / "out")
