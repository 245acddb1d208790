"""Synthetic scenes: georeferencing, truth, determinism, variants, memory and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from shapely.geometry import box, shape
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.errors import ConfigError, StorageError
from retrain_lib.devtools.synthetic import (
    SceneSpec,
    make_drop,
    plan_objects,
    scene_transform,
    write_annotations,
    write_scene,
)
from tests.conftest import REPO_ROOT

ORIGIN = (500_000.0, 4_600_000.0)


def small_spec(scene_id: str = "s1", **changes: object) -> SceneSpec:
    """A quick scene: 256 px, a handful of objects and decoys."""
    values: dict[str, object] = {"width": 256, "height": 256, "origin": ORIGIN,
                                 "objects_per_class": 4, "decoys": 4, "seed": 7}
    values.update(changes)
    return SceneSpec(scene_id, **values)  # type: ignore[arg-type]


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def load_geojson(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_crs_transform_tiling_and_compression(tmp_path: Path) -> None:
    spec = small_spec(width=700, height=600, gsd_m=0.3, epsg=32632)
    scene = write_scene(tmp_path / "a.tif", spec)
    with rasterio.open(scene.path) as ds:
        assert ds.crs.to_epsg() == 32632
        assert ds.transform == Affine(0.3, 0, ORIGIN[0], 0, -0.3, ORIGIN[1])
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (700, 600, 3, "uint8")
        assert ds.block_shapes == [(512, 512)] * 3
        assert ds.compression.name.lower() == "deflate"
        assert ds.nodata is None
        assert ds.descriptions == ("red", "green", "blue")
    assert scene.crs == "EPSG:32632"
    assert scene.transform == ds.transform


def test_default_origin_is_in_the_zone_and_differs_per_scene() -> None:
    a = scene_transform(SceneSpec("a"))
    b = scene_transform(SceneSpec("b"))
    assert (a.c, a.f) != (b.c, b.f)
    for t in (a, b):  # UTM 33N around the middle of the zone, in the northern hemisphere
        assert 250_000 < t.c < 750_000 and 0 < t.f < 9_300_000
    assert scene_transform(SceneSpec("a")) == a


def test_annotations_inside_scene_and_valid_area(tmp_path: Path) -> None:
    border = 24
    spec = small_spec(width=320, height=288, nodata_border=border, objects_per_class=6)
    scene = write_scene(tmp_path / "b.tif", spec)
    geojson = write_annotations(tmp_path / "b.geojson", scene)
    data = read(scene.path)
    t = scene.transform
    valid = box(t.c + border * t.a, t.f + (spec.height - border) * t.e,
                t.c + (spec.width - border) * t.a, t.f + border * t.e)
    features = load_geojson(geojson)["features"]
    assert len(features) == 12
    for feature in features:
        polygon = shape(feature["geometry"])
        assert valid.contains(polygon)
        col, row = ~t @ (polygon.centroid.x, polygon.centroid.y)
        assert data[:, int(row), int(col)].min() > 0  # not nodata under the object


def test_nodata_border_is_nodata_and_declared(tmp_path: Path) -> None:
    border = 16
    scene = write_scene(tmp_path / "c.tif", small_spec(nodata_border=border))
    with rasterio.open(scene.path) as ds:
        assert ds.nodata == 0
        data = ds.read()
    frame = np.ones(data.shape[1:], bool)
    frame[border:-border, border:-border] = False
    assert (data[:, frame] == 0).all()
    assert (data[:, ~frame] > 0).all()


def test_same_seed_same_scene_other_seed_differs(tmp_path: Path) -> None:
    outputs = []
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        scene = write_scene(tmp_path / f"{name}.tif", small_spec(seed=seed))
        geojson = write_annotations(tmp_path / f"{name}.geojson", scene)
        outputs.append((read(scene.path), geojson.read_bytes()))
    (a, ga), (b, gb), (c, gc) = outputs
    assert np.array_equal(a, b) and ga == gb
    assert not np.array_equal(a, c) and ga != gc


def test_blocks_render_the_same_in_any_order(tmp_path: Path) -> None:
    from shapely import STRtree

    from retrain_lib.devtools.synthetic_plan import plan_placements
    from retrain_lib.devtools.synthetic_render import render_block, salts

    spec = small_spec(width=1100, height=600, objects_per_class=10)
    whole = read(write_scene(tmp_path / "w.tif", spec).path)
    placements = [p for _, p in plan_placements(spec)]
    tree = STRtree([box(*p.footprint()) for p in placements])
    block_salts = salts(spec.seed)
    for brow, bcol in [(1, 2), (0, 1), (1, 0), (0, 0)]:  # not the writing order
        block = render_block(spec, placements, tree, block_salts, 512, brow, bcol)
        rows, cols = block.shape[1:]
        expected = whole[:, brow * 512:brow * 512 + rows, bcol * 512:bcol * 512 + cols]
        assert np.array_equal(block, expected)


def test_four_band_uint16_variant(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "m.tif", small_spec(bands=4, dtype="uint16"))
    with rasterio.open(scene.path) as ds:
        assert (ds.count, ds.dtypes[0]) == (4, "uint16")
        assert ds.descriptions == ("red", "green", "blue", "nir")
        data = ds.read()
    assert data.min() >= 1 and data.max() <= 4095
    assert data.max() > 255  # really uses the 12-bit range
    red, green, _, nir = (float(np.median(b)) for b in data)
    assert nir > green > red  # vegetation: bright in NIR, green over red


def test_decoys_are_rendered_but_not_annotated(tmp_path: Path) -> None:
    spec = small_spec(width=512, height=512, objects_per_class=5, decoys=12)
    scene = write_scene(tmp_path / "d.tif", spec)
    features = load_geojson(write_annotations(tmp_path / "d.geojson", scene))["features"]
    decoys = [o for o in scene.objects if o.is_decoy]
    assert len(decoys) == 12 and all(o.class_name is None for o in decoys)
    assert len(features) == 10
    assert sorted(f["properties"]["class"] for f in features) == ["car"] * 5 + ["truck"] * 5
    annotated = [shape(f["geometry"]) for f in features]
    for decoy in decoys:
        assert not any(decoy.polygon_map.intersects(p) for p in annotated)
    # Each decoy changes the pixels under it: it is drawn, not just listed.
    plain = read(write_scene(tmp_path / "e.tif", small_spec(
        width=512, height=512, objects_per_class=5, decoys=0)).path)
    data = read(scene.path)
    for decoy in decoys:
        col, row = (int(v) for v in decoy.polygon_px.exterior.coords[0])
        window = np.s_[:, max(row - 3, 0):row + 3, max(col - 3, 0):col + 3]
        assert np.abs(data[window].astype(int) - plain[window].astype(int)).max() > 20


def test_objects_never_overlap_and_classes_differ_in_size() -> None:
    objects = plan_objects(SceneSpec("p", classes=("a", "b", "c"), objects_per_class=30,
                                     decoys=30))
    polygons = [o.polygon_px for o in objects]
    for i, polygon in enumerate(polygons):
        assert not any(polygon.intersects(other) for other in polygons[i + 1:])
    area = {name: np.mean([o.polygon_px.area for o in objects if o.class_name == name])
            for name in ("a", "b", "c")}
    assert area["a"] < 0.6 * area["b"] and area["a"] < 0.6 * area["c"]


def _tiles_holding(objects: list, tile: int = 256) -> set[tuple[int, int]]:
    return {(int(o.polygon_px.centroid.x) // tile, int(o.polygon_px.centroid.y) // tile)
            for o in objects}


def test_clustered_layout_gathers_objects_and_scatters_decoys() -> None:
    def plan(clusters: int) -> tuple[list, list]:
        objects = plan_objects(SceneSpec("c", width=1280, height=1280, objects_per_class=12,
                                         decoys=60, clusters=clusters, seed=3))
        return ([o for o in objects if not o.is_decoy], [o for o in objects if o.is_decoy])

    spread, spread_decoys = plan(0)
    lots, lot_decoys = plan(2)
    assert len(lots) == len(spread) == 24 and len(lot_decoys) == len(spread_decoys) == 60
    assert {o.class_name for o in lots} == {"car", "truck"}
    # The 24 objects fill at most a handful of the 25 tiles; spread out they fill most.
    assert len(_tiles_holding(lots)) <= 8 < 14 <= len(_tiles_holding(spread))
    outside = [d for d in lot_decoys if _tiles_holding([d]) - _tiles_holding(lots)]
    assert len(outside) >= 0.7 * len(lot_decoys)
    polygons = [o.polygon_px for o in lots + lot_decoys]
    for i, polygon in enumerate(polygons):
        assert not any(polygon.intersects(other) for other in polygons[i + 1:])
    again, _ = plan(2)
    assert [o.polygon_px.wkt for o in again] == [o.polygon_px.wkt for o in lots]


def test_objects_stand_out_from_the_background(tmp_path: Path) -> None:
    for region in ("vegetated", "arid"):
        spec = small_spec(f"r-{region}", width=512, height=512, region=region, decoys=0)
        scene = write_scene(tmp_path / f"{region}.tif", spec)
        data = read(scene.path).astype(float)
        background = np.median(data, axis=(1, 2))
        for obj in scene.objects:
            minx, miny, maxx, maxy = (int(v) for v in obj.polygon_px.bounds)
            patch = data[:, miny:maxy + 1, minx:maxx + 1]
            colour_distance = np.sqrt(((patch - background[:, None, None]) ** 2).sum(axis=0))
            luminance = patch.mean(axis=0)
            # A body of another colour, with dark markings on it.
            assert colour_distance.max() > 60, (region, obj.class_name)
            assert luminance.max() - luminance.min() > 50, (region, obj.class_name)


def test_annotations_in_epsg4326_reproject_back(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "g.tif", small_spec())
    data = load_geojson(write_annotations(tmp_path / "g.geojson", scene, to_epsg=4326))
    assert "crs" not in data  # RFC 7946: coordinates are WGS 84 longitude/latitude
    back = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    for feature, obj in zip(data["features"], scene.annotations, strict=True):
        lon, lat = np.array(feature["geometry"]["coordinates"][0]).T
        assert lon.min() > 12 and lon.max() < 18  # inside UTM zone 33
        x, y = back.transform(lon, lat)
        expected = np.array(obj.polygon_map.exterior.coords)
        # Same corners, maybe another start point and winding: compare as sets.
        for corner in expected:
            assert np.hypot(x - corner[0], y - corner[1]).min() < 0.01


def test_geojson_has_legacy_crs_and_class_property(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "h.tif", small_spec())
    data = load_geojson(write_annotations(tmp_path / "h.geojson", scene))
    assert data["type"] == "FeatureCollection"
    assert data["crs"] == {"type": "name",
                           "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    feature = data["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert set(feature["properties"]) == {"class"}


def test_make_drop_pairs_scenes_with_annotations(tmp_path: Path) -> None:
    drop = tmp_path / "drop-1"
    scenes = make_drop(drop, [small_spec("one"), small_spec("two", region="arid", seed=8)])
    assert sorted(p.name for p in drop.iterdir()) == [
        "one.geojson", "one.tif", "two.geojson", "two.tif"]
    assert [s.annotations_path for s in scenes] == [drop / "one.geojson", drop / "two.geojson"]
    with pytest.raises(ConfigError, match="repeated: one"):
        make_drop(tmp_path / "drop-2", [small_spec("one"), small_spec("one")])
    assert not (tmp_path / "drop-2").exists()


def test_unwritable_path_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write"):
        write_scene(blocker / "scene.tif", small_spec())


@pytest.mark.parametrize(("changes", "message"), [
    ({"width": 10}, "width: got 10"),
    ({"epsg": 4326}, "projected CRS in metres"),
    ({"epsg": 999999}, "not a known EPSG code"),
    ({"region": "desert"}, "region: got 'desert'"),
    ({"bands": 5}, "bands: got 5"),
    ({"dtype": "float32"}, "dtype: got 'float32'"),
    ({"classes": tuple("abcdefghi")}, "1 to 8 classes"),
    ({"classes": ("car", "Car")}, "must be unique"),
    ({"seed": -1}, "seed: got -1"),
    ({"clusters": -2}, "clusters: got -2"),
    ({"nodata_border": 100}, "nodata_border: got 100"),
    ({"objects_per_class": 100}, "do not fit in 256x256 px"),
])
def test_bad_specs_are_config_errors(changes: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        write_scene(tmp_path / "bad.tif", small_spec(**changes))
    assert not list(tmp_path.iterdir())


def test_bad_scene_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="scene_id"):
        SceneSpec("../escape")


def test_block_wise_writing_keeps_memory_bounded(tmp_path: Path) -> None:
    # A 4096 x 4096 4-band uint16 raster is 128 MiB (256 MiB as the float32 a renderer would
    # hold). Writing it block by block must add less than 48 MiB to the peak RSS measured after
    # a warm-up scene (measured: about 25 MiB, independent of the scene size).
    script = textwrap.dedent(f"""
        import resource
        from retrain_lib.devtools.synthetic import SceneSpec, write_scene
        def peak_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        spec = dict(bands=4, dtype="uint16", objects_per_class=50, decoys=50)
        write_scene({str(tmp_path / 'warm.tif')!r},
                    SceneSpec("warm", width=1024, height=1024, **spec))
        before = peak_mib()
        write_scene({str(tmp_path / 'big.tif')!r},
                    SceneSpec("big", width=4096, height=4096, **spec))
        print(peak_mib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    growth_mib = float(result.stdout.strip())
    assert growth_mib < 48, f"peak RSS grew by {growth_mib:.0f} MiB"
    with rasterio.open(tmp_path / "big.tif") as ds:
        assert (ds.width, ds.height, ds.count) == (4096, 4096, 4)


def test_cli_synth_writes_drops_and_reports_them(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, [
        "synth", "--out", str(tmp_path), "--config",
        str(REPO_ROOT / "configs" / "object_types" / "aircraft.yaml"), "--drops", "2",
        "--scenes-per-drop", "2", "--size", "256", "--objects-per-class", "3", "--decoys", "2",
        "--region", "arid", "--seed", "5", "--bands", "4", "--uint16", "--nodata-border", "8",
    ])
    assert result.exit_code == 0, result.output
    drops = sorted(p.name for p in tmp_path.iterdir())
    assert drops == ["arid-s5-d00", "arid-s5-d01"]
    files = sorted(p.name for p in (tmp_path / "arid-s5-d01").iterdir())
    assert files == ["arid-s5-d01-00.geojson", "arid-s5-d01-00.tif",
                     "arid-s5-d01-01.geojson", "arid-s5-d01-01.tif"]
    assert "airplane=3" in result.output and "helicopter=3" in result.output
    classes = {f["properties"]["class"] for f in load_geojson(
        tmp_path / "arid-s5-d00" / "arid-s5-d00-00.geojson")["features"]}
    assert classes == {"airplane", "helicopter"}
    # Every scene got its own seed.
    arrays = [read(p) for p in sorted(tmp_path.glob("*/*.tif"))]
    assert not any(np.array_equal(arrays[0], a) for a in arrays[1:])
    # Writing the same drops again needs --overwrite.
    again = runner.invoke(app, ["synth", "--out", str(tmp_path), "--size", "256",
                                "--objects-per-class", "3", "--region", "arid", "--seed", "5"])
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("args", [
    ["--region", "desert"],
    ["--size", "10"],
    ["--bands", "5"],
    ["--drops", "0"],
    ["--classes", "car,,truck"],
    ["--classes", "car", "--config", "configs/object_types/vehicle.yaml"],
    ["--objects-per-class", "500"],
    ["--clusters", "-1"],
])
def test_cli_synth_bad_values_exit_2(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--size", "256", *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())
