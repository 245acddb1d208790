"""Tests of retrain_lib.geo: GeoJSON I/O, CRS handling and pixel <-> map conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyproj
import pytest
import shapely
from affine import Affine

from retrain_lib.core.errors import InputError
from retrain_lib.geo.annotations import repair_polygons
from retrain_lib.geo.crs import (
    WGS84,
    map_to_pixel,
    pixel_size,
    pixel_to_map,
    reproject_geometries,
    scene_gsd_m,
    to_crs,
)
from retrain_lib.geo.geojson import Feature, read_geojson, write_geojson
from retrain_lib.geo.windows import PixelWindow

UTM33 = pyproj.CRS.from_epsg(32633)
# 0.5 m pixels, north-up, top-left corner at (500000, 5000000) in UTM 33N.
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5000000.0)


def _collection(features: list[dict], crs: object = None) -> dict:
    doc: dict = {"type": "FeatureCollection", "features": features}
    if crs is not None:
        doc["crs"] = crs
    return doc


def _square(x: float, y: float, size: float = 10.0, **properties: object) -> dict:
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    return {"type": "Feature", "properties": properties,
            "geometry": {"type": "Polygon", "coordinates": [ring]}}


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("member", [
    {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}},
    {"type": "name", "properties": {"name": "EPSG:32633"}},
    {"type": "EPSG", "properties": {"code": 32633}},
    "EPSG:32633",
])
def test_read_geojson_honours_legacy_crs_member(tmp_path: Path, member: object) -> None:
    path = _write(tmp_path / "a.geojson", _collection([_square(500010, 4999990)], member))
    features, crs = read_geojson(path)
    assert crs == UTM33
    assert features[0].geometry.bounds == (500010, 4999990, 500020, 5000000)


def test_read_geojson_defaults_to_wgs84_and_treats_crs84_as_wgs84(tmp_path: Path) -> None:
    plain = _write(tmp_path / "plain.geojson", _collection([_square(15, 45, 0.001)]))
    crs84 = _write(tmp_path / "crs84.geojson", _collection(
        [], {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}))
    assert read_geojson(plain)[1] == WGS84
    assert read_geojson(crs84)[1] == WGS84


def test_read_geojson_keeps_ids_properties_and_positions(tmp_path: Path) -> None:
    features = [_square(0, 0, **{"class": "car"}), _square(20, 0, **{"class": "truck", "id": 7})]
    features[0]["id"] = "a1"
    path = _write(tmp_path / "a.geojson", _collection(features))
    read, _ = read_geojson(path)
    assert [(f.id, f.index, f.properties["class"]) for f in read] == [
        ("a1", 0, "car"), (7, 1, "truck")]
    assert read[1].describe() == "feature 1 (id 7)"


@pytest.mark.parametrize("text", ["", "  \n", '{"type": "FeatureCollection", "features": []}'])
def test_empty_annotation_files_are_valid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.geojson"
    path.write_text(text, encoding="utf-8")
    assert read_geojson(path) == ([], WGS84)


def _polygon(second_x: str) -> str:
    """A one-feature collection whose square's second position has ``second_x`` as x."""
    return ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
            f'"geometry": {{"type": "Polygon", "coordinates": [[[0, 0], [{second_x}, 0], '
            '[1, 1], [0, 1], [0, 0]]]}}]}')


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not valid JSON at line 1"),
    ('{"type": "Polygon", "coordinates": []}', "expected a GeoJSON FeatureCollection"),
    ('{"type": "FeatureCollection", "features": [], "crs": "EPSG:999999"}',
     "unknown coordinate reference system"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "id": "x9", '
     '"properties": {}, "geometry": null}]}', r"feature 0 \(id 'x9'\): has no geometry"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
     '"geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]}',
     r"feature 0: Polygon coordinates\[0\]\[0\]: got 1; expected a position \[x, y\]"),
    *[(_polygon(bad), expected) for bad, expected in [
        ("NaN", r"feature 0: Polygon coordinates\[0\]\[1\]\[0\]: got NaN; expected a finite"),
        ("-Infinity", r"coordinates\[0\]\[1\]\[0\]: got -Infinity; expected a finite number"),
        ('"12"', r"coordinates\[0\]\[1\]\[0\]: got \"12\"; expected a number"),
        ("true", r"coordinates\[0\]\[1\]\[0\]: got true; expected a number"),
        ("[1]", r"coordinates\[0\]\[1\]\[0\]: got \[1\]; expected a number"),
    ]],
    (_polygon("1, 0, 0"), r"feature 0: Polygon coordinates\[0\]\[1\]: a "
     r"position has 4 number\(s\); expected \[x, y\] or \[x, y, z\]"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
     '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}}]}',
     r"feature 0: Polygon ring coordinates\[0\] has 3 position\(s\); a ring needs at least 4"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
     '"geometry": {"type": "Circle", "coordinates": [0, 0]}}]}',
     "feature 0: unknown geometry type 'Circle'; expected a Polygon or MultiPolygon"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
     '"geometry": {"type": "MultiPolygon"}}]}', "feature 0: the MultiPolygon has no"),
])
def test_bad_geojson_names_file_and_feature(tmp_path: Path, content: str, expected: str
                                            ) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=expected) as info:
        read_geojson(path)
    assert str(path) in str(info.value)


def test_missing_geojson_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="annotation file not found"):
        read_geojson(tmp_path / "nope.geojson")


def test_write_geojson_round_trips_with_legacy_crs(tmp_path: Path) -> None:
    features = [Feature(shapely.box(500000.25, 4999000.5, 500003.75, 4999002.0),
                        {"class": "car", "score": np.float32(0.5)}, id="p1"),
                Feature(shapely.box(1, 2, 3, 4), {"class": "truck"})]
    path = tmp_path / "out" / "pred.geojson"
    write_geojson(path, features, "EPSG:32633")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    read, crs = read_geojson(path)
    assert crs == UTM33
    assert [f.geometry.equals_exact(g.geometry, 0) for f, g in zip(read, features, strict=True)
            ] == [True, True]
    assert read[0].id == "p1" and read[0].properties == {"class": "car", "score": 0.5}
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_write_geojson_in_wgs84_has_no_crs_member(tmp_path: Path) -> None:
    path = tmp_path / "a.geojson"
    write_geojson(path, [Feature(shapely.box(15, 45, 15.001, 45.001), {})], 4326)
    assert "crs" not in json.loads(path.read_text(encoding="utf-8"))
    write_geojson(path, [], "EPSG:4326")  # replaces the file atomically
    assert read_geojson(path) == ([], WGS84)


def test_map_pixel_conversion_known_values_and_round_trip() -> None:
    geom = shapely.box(500010.0, 4999980.0, 500020.0, 4999990.0)
    pixel = map_to_pixel(geom, TRANSFORM)
    assert pixel.bounds == (20.0, 20.0, 40.0, 40.0)
    rotated = Affine.translation(300000, 4000000) @ Affine.rotation(17) @ Affine.scale(0.3, -0.3)
    boxes = shapely.box(np.array([0.0, 100.5]), np.array([0.0, 7.25]), np.array([10.0, 131.0]),
                        np.array([3.0, 9.75]))
    back = map_to_pixel(pixel_to_map(boxes, rotated), rotated)
    assert all(shapely.equals_exact(back, boxes, tolerance=1e-6))


def test_reproject_round_trip_and_axis_order() -> None:
    lonlat = shapely.box(15.0, 45.0, 15.001, 45.001)
    utm = reproject_geometries(lonlat, "EPSG:4326", 32633)
    x, y = utm.exterior.coords[0]
    assert 400000 < x < 700000 and 4900000 < y < 5100000  # lon/lat read as x/y
    back = reproject_geometries(np.array([utm], dtype=object), UTM33, WGS84)
    assert shapely.equals_exact(back[0], lonlat, tolerance=1e-9)


def test_reproject_rejects_coordinates_outside_the_crs() -> None:
    with pytest.raises(InputError, match=r"cannot be transformed .* \(positions 1\)"):
        reproject_geometries(np.array([shapely.box(15, 45, 16, 46),
                                       shapely.box(15, 95, 16, 96)], dtype=object),
                             "EPSG:4326", "EPSG:32633")


def test_ground_sample_distance() -> None:
    assert pixel_size(TRANSFORM) == (0.5, 0.5)
    assert scene_gsd_m(TRANSFORM, UTM33) == pytest.approx(0.5)
    feet = pyproj.CRS.from_epsg(2263)  # NY Long Island, US survey feet
    assert scene_gsd_m(Affine(1, 0, 0, 0, -1, 0), feet) == pytest.approx(0.3048006)
    degree = Affine(1e-5, 0, 0.0, 0, -1e-5, 0.0)  # at the equator: ~1.11 m
    assert scene_gsd_m(degree, WGS84) == pytest.approx(1.1105, rel=1e-3)


def test_to_crs_accepts_rasterio_crs_and_rejects_nonsense() -> None:
    from rasterio.crs import CRS

    assert to_crs(CRS.from_epsg(32633)) == UTM33
    with pytest.raises(InputError, match="not a coordinate reference system"):
        to_crs("EPSG:no")


def test_pixel_window_value_object() -> None:
    window = PixelWindow(10, 20, 30, 40)
    assert window.bounds == (10, 20, 40, 60)
    assert PixelWindow.from_bounds(*window.bounds) == window
    assert PixelWindow.from_slices(*window.slices) == window
    assert PixelWindow.from_rasterio(window.to_rasterio()) == window
    assert window.area_px == 1200
    assert window.intersection(PixelWindow(35, 0, 100, 25)) == PixelWindow(35, 20, 5, 5)
    assert window.intersection(PixelWindow(40, 20, 5, 5)) is None
    assert window.relative_to(PixelWindow(5, 5, 100, 100)) == PixelWindow(5, 15, 30, 40)
    assert window.to_box().bounds == (10, 20, 40, 60)
    assert window.map_bounds(TRANSFORM) == (500005.0, 4999970.0, 500020.0, 4999990.0)
    assert window.window_transform(TRANSFORM) @ (0, 0) == (500005.0, 4999990.0)
    with pytest.raises(ValueError, match="positive size"):
        PixelWindow(0, 0, 0, 5)
    with pytest.raises(TypeError):
        PixelWindow(0.5, 0, 1, 1)  # type: ignore[arg-type]


def test_repair_polygons_fixes_bowtie_and_drops_what_has_no_area() -> None:
    bowtie = shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])
    spike = shapely.Polygon([(0, 0), (1, 0), (2, 0), (1, 0)])
    fixed, reasons = repair_polygons([bowtie, shapely.box(0, 0, 1, 1), spike])
    assert fixed[0].geom_type == "MultiPolygon" and fixed[0].area == pytest.approx(2.0)
    assert fixed[1].equals(shapely.box(0, 0, 1, 1))
    assert fixed[2] is None
    assert reasons[0].startswith("Self-intersection") and reasons[1] is None
