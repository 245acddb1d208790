"""Sliced scene inference, cross-tile merge, georeferenced output, model sources."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.config import TilingConfig
from retrain_lib.core.errors import ConfigError, InputError
from retrain_lib.geo.boxes import merge_detections, overlapping_pairs
from retrain_lib.stages.evaluate import SceneEvalInput, evaluate_scenes
from retrain_lib.stages.inference import (
    DetectOptions,
    Detector,
    detect_scene,
    load_detector,
    write_detections,
)
from retrain_lib.stages.weights import ModelRef, resolve_model

CLASSES = ("car", "truck")
COLOURS = {0: (230, 30, 30), 1: (30, 30, 230)}  # car red, truck blue
ORIGIN = (400_000.0, 6_000_000.0)
GSD = 0.5


# ----------------------------------------------------------------------------- a scene of blobs


class BlobDetector(Detector):
    """A real (classical) detector for the blob scenes below: connected red or blue pixels.

    It sees only the tile's pixels, so objects cut by a tile edge come out as fragments,
    exactly like a learned detector's boxes of partly visible objects.
    """

    def __init__(self) -> None:
        self.ref = ModelRef(weights=Path("blobs.pt"), name="blobs", version="1",
                            source="blobs")
        self.class_names = CLASSES
        self.stride = 32
        self.half = False
        self.max_det = 1000
        self.batch_shapes: list[tuple[int, ...]] = []

    def predict(self, tiles: np.ndarray, *, conf: float, iou: float) -> list[np.ndarray]:
        from scipy import ndimage

        self.batch_shapes.append(tiles.shape)
        out = []
        for tile in tiles:
            rows = []
            for cls, colour in COLOURS.items():
                mask = np.all(np.abs(tile.astype(int) - colour) < 20, axis=-1)
                labels, _ = ndimage.label(mask)
                for found in ndimage.find_objects(labels):
                    r, c = found
                    rows.append([c.start, r.start, c.stop, r.stop, 0.9, cls])
            out.append(np.array(rows, np.float32).reshape(-1, 6))
        return out


def write_blob_scene(path: Path, width: int, height: int,
                     objects: list[tuple[int, int, int, int, int]], *,
                     nodata_cols: int = 0, crs: str | None = "EPSG:32633") -> Path:
    """Grey scene with coloured rectangles (col0, row0, col1, row1, class)."""
    data = np.full((3, height, width), 90, np.uint8)
    for c0, r0, c1, r1, cls in objects:
        data[:, r0:r1, c0:c1] = np.array(COLOURS[cls], np.uint8)[:, None, None]
    profile: dict[str, Any] = {"driver": "GTiff", "width": width, "height": height,
                               "count": 3, "dtype": "uint8"}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(*ORIGIN, GSD, GSD))
    if nodata_cols:
        data[:, :, :nodata_cols] = 0
        profile["nodata"] = 0
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def seam_objects() -> list[tuple[int, int, int, int, int]]:
    """Small objects (<= 12 px) on and between the seams of a 64 px / 16 px-overlap grid."""
    objects = []
    rng = np.random.default_rng(7)
    occupied = np.zeros((150, 200), bool)
    # Deliberately across the vertical seams (x = 48, 64, 96, 112, 136, 160) and rows.
    anchors = [(58, 10), (106, 30), (155, 60), (42, 44), (60, 60), (130, 100)]
    while len(objects) < 25:
        if anchors:
            c0, r0 = anchors.pop()
        else:
            c0, r0 = int(rng.integers(0, 188)), int(rng.integers(0, 138))
        w, h = int(rng.integers(5, 13)), int(rng.integers(5, 13))
        c1, r1 = min(c0 + w, 200), min(r0 + h, 150)
        if occupied[max(r0 - 2, 0):r1 + 2, max(c0 - 2, 0):c1 + 2].any():
            continue
        occupied[r0:r1, c0:c1] = True
        objects.append((c0, r0, c1, r1, len(objects) % 2))
    return objects


BLOB_TILING = TilingConfig(tile_size=64, overlap=16)


def truth_input(objects: list[tuple[int, int, int, int, int]], detections: Any
                ) -> SceneEvalInput:
    return SceneEvalInput("blobs", detections.boxes, detections.classes, detections.scores,
                          np.array([o[:4] for o in objects], float),
                          np.array([o[4] for o in objects]))


def sorted_boxes(boxes: np.ndarray) -> list[tuple[float, ...]]:
    return sorted(tuple(float(v) for v in b) for b in boxes)


def test_detect_scene_finds_each_object_once_across_seams(tmp_path: Path) -> None:
    objects = seam_objects()
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, objects)
    detector = BlobDetector()
    progress: list[tuple[int, int]] = []
    result = detect_scene(scene, detector, DetectOptions(tiling=BLOB_TILING, batch=5),
                          on_progress=lambda d, t: progress.append((d, t)))
    assert result.stats.tiles_total == 4 * 3  # columns 0,48,96,136 x rows 0,48,86
    assert sorted_boxes(result.boxes) == sorted_boxes(np.array([o[:4] for o in objects]))
    assert result.stats.boxes_cut_off > 0  # seam fragments were seen and dropped
    metrics = evaluate_scenes([truth_input(objects, result)], list(CLASSES))
    assert metrics.map50_95 == pytest.approx(1.0)
    assert progress[-1] == (12, 12) and progress[0] == (0, 12)
    assert {s[0] for s in detector.batch_shapes} <= {5, 2}  # batches of 5, then the rest
    assert all(s[1:] == (64, 64, 3) for s in detector.batch_shapes)


def write_blob_truth(path: Path, objects: list[tuple[int, int, int, int, int]]) -> Path:
    """Truth of a blob scene as GeoJSON in EPSG:4326 (lon/lat), as analysts often send."""
    import pyproj

    to_lonlat = pyproj.Transformer.from_crs(32633, 4326, always_xy=True)
    features = []
    for c0, r0, c1, r1, cls in objects:
        xs = [ORIGIN[0] + c * GSD for c in (c0, c1, c1, c0, c0)]
        ys = [ORIGIN[1] - r * GSD for r in (r0, r0, r1, r1, r0)]
        lon, lat = to_lonlat.transform(xs, ys)
        ring = [[a, b] for a, b in zip(lon, lat, strict=True)]
        features.append({"type": "Feature", "properties": {"class": CLASSES[cls].upper()},
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_detections_score_against_a_truth_file(tmp_path: Path) -> None:
    objects = seam_objects()
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, objects)
    truth = write_blob_truth(tmp_path / "truth.geojson", objects)
    result = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING))
    scene_input = result.to_eval_input(truth)
    np.testing.assert_allclose(scene_input.truth_boxes[:, 0],
                               [o[0] for o in objects], atol=1e-6)
    metrics = evaluate_scenes([scene_input], list(CLASSES))
    assert metrics.map50_95 == pytest.approx(1.0)
    boats = write_blob_truth(tmp_path / "boats.geojson", [(0, 0, 5, 5, 0)])
    boats.write_text(boats.read_text().replace('"CAR"', '"boat"'))
    with pytest.raises(InputError, match=r"boats\.geojson: feature 0 has class 'boat', which "
                       "the model blobs does not know"):
        result.to_eval_input(boats)


def test_merge_modes_on_seam_fragments(tmp_path: Path) -> None:
    objects = seam_objects()
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, objects)
    truth = sorted_boxes(np.array([o[:4] for o in objects]))
    # Without dropping cut-off boxes, NMS by IoU keeps fragments next to the whole boxes...
    nms = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING,
                                                            drop_cut_off=False))
    assert len(nms.boxes) > len(objects)
    # ... while NMM by IoS folds each fragment into the whole box that contains it.
    nmm = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING,
                                                            drop_cut_off=False, merge="nmm"))
    assert sorted_boxes(nmm.boxes) == truth
    raw = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING,
                                                            drop_cut_off=False, merge="none"))
    assert len(raw.boxes) == raw.stats.boxes_raw > len(nms.boxes)


@pytest.mark.parametrize("readers", [0, 3])
def test_reader_threads_do_not_change_the_result(tmp_path: Path, readers: int) -> None:
    objects = seam_objects()
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, objects)
    options = DetectOptions(tiling=BLOB_TILING, batch=3, readers=readers, prefetch_batches=1)
    result = detect_scene(scene, BlobDetector(), options)
    assert sorted_boxes(result.boxes) == sorted_boxes(np.array([o[:4] for o in objects]))
    assert result.stats.tiles_total == 12 and result.stats.tiles_skipped_nodata == 0


def test_object_larger_than_the_overlap_becomes_one_box_with_nmm(tmp_path: Path) -> None:
    # 30 px wide across the seam at x = 48..64: no tile sees it whole, and it is too big for
    # the cut-off rule, so its two fragments reach the merge. NMM joins them.
    objects = [(40, 20, 70, 30, 1)]
    scene = write_blob_scene(tmp_path / "big.tif", 128, 64, objects)
    options = DetectOptions(tiling=BLOB_TILING, merge="nmm")
    result = detect_scene(scene, BlobDetector(), options)
    assert sorted_boxes(result.boxes) == [(40.0, 20.0, 70.0, 30.0)]
    assert result.classes.tolist() == [1]


def test_nodata_tiles_are_skipped(tmp_path: Path) -> None:
    objects = [(150, 20, 160, 30, 0)]
    scene = write_blob_scene(tmp_path / "nodata.tif", 200, 64, objects, nodata_cols=112)
    detector = BlobDetector()
    result = detect_scene(scene, detector, DetectOptions(tiling=BLOB_TILING))
    # Tiles at columns 0 and 48 lie wholly in the nodata strip (0..112); 96 and 136 do not.
    assert result.stats.tiles_total == 4
    assert result.stats.tiles_skipped_nodata == 2
    assert sum(s[0] for s in detector.batch_shapes) == 2
    assert sorted_boxes(result.boxes) == [(150.0, 20.0, 160.0, 30.0)]


def test_scene_smaller_than_a_tile_is_padded(tmp_path: Path) -> None:
    objects = [(3, 4, 13, 10, 0)]
    scene = write_blob_scene(tmp_path / "small.tif", 40, 50, objects)
    detector = BlobDetector()
    result = detect_scene(scene, detector, DetectOptions(tiling=BLOB_TILING))
    assert detector.batch_shapes == [(1, 64, 64, 3)]  # 50 x 40 padded to the stride
    assert sorted_boxes(result.boxes) == [(3.0, 4.0, 13.0, 10.0)]


def test_scene_without_crs_is_an_error_naming_it(tmp_path: Path) -> None:
    scene = write_blob_scene(tmp_path / "plain.tif", 64, 64, [], crs=None)
    with pytest.raises(InputError, match=r"plain\.tif: the raster has no CRS"):
        detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING))


# ----------------------------------------------------------------------------- output


def test_geojson_output_is_placed_in_the_scene_crs_and_wgs84(tmp_path: Path) -> None:
    import pyproj
    import shapely

    from retrain_lib.geo.crs import WGS84, map_to_pixel
    from retrain_lib.geo.geojson import read_geojson

    objects = seam_objects()
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, objects)
    result = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING))
    out, lonlat = tmp_path / "out" / "pred.geojson", tmp_path / "out" / "pred_4326.geojson"
    assert write_detections(result, out, wgs84_path=lonlat) == [out, lonlat]

    raw = json.loads(out.read_text())
    assert raw["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    features, crs = read_geojson(out)
    assert crs == pyproj.CRS.from_epsg(32633)
    first = features[0].properties
    assert set(first) == {"class", "class_id", "score", "model", "model_version", "scene_id"}
    assert (first["model"], first["model_version"], first["scene_id"]) == ("blobs", "1",
                                                                           "blobs")
    pixel = shapely.bounds(map_to_pixel(np.array([f.geometry for f in features]),
                                        result.scene.transform))
    np.testing.assert_allclose(pixel, result.boxes, atol=1e-6)
    # A known object in map units: columns 58..x, rows 10..y from the top-left corner.
    xs = np.array([f.geometry.bounds[0] for f in features])
    assert np.isclose(xs, ORIGIN[0] + 58 * GSD).any()

    wgs_features, wgs_crs = read_geojson(lonlat)
    assert wgs_crs == WGS84 and "crs" not in json.loads(lonlat.read_text())
    to_utm = pyproj.Transformer.from_crs(4326, 32633, always_xy=True)
    lon, lat = wgs_features[0].geometry.exterior.coords[0]
    x, y = to_utm.transform(lon, lat)
    assert (x, y) == pytest.approx(features[0].geometry.exterior.coords[0], abs=1e-3)


def test_geopackage_output(tmp_path: Path) -> None:
    pyogrio = pytest.importorskip("pyogrio")
    scene = write_blob_scene(tmp_path / "blobs.tif", 200, 150, seam_objects())
    result = detect_scene(scene, BlobDetector(), DetectOptions(tiling=BLOB_TILING))
    path = tmp_path / "pred.gpkg"
    write_detections(result, path)
    info = pyogrio.read_info(path, layer="detections")
    assert info["features"] == len(result.boxes)
    assert "32633" in info["crs"]
    assert set(info["fields"]) >= {"class", "score", "model", "model_version", "scene_id"}
    with pytest.raises(ConfigError, match=r"pred\.shp: unknown output format"):
        write_detections(result, tmp_path / "pred.shp")


# ----------------------------------------------------------------------------- merge


def test_nms_equals_torchvision_batched_nms() -> None:
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (3000, 2))
    boxes = np.hstack([xy, xy + rng.uniform(5, 40, (3000, 2))])
    scores = rng.random(3000)
    classes = rng.integers(0, 3, 3000)
    ours = merge_detections(boxes, scores, classes, method="nms", threshold=0.5)
    ref = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores),
                                      torch.tensor(classes), 0.5).numpy()
    np.testing.assert_array_equal(ours.kept, ref)  # same boxes, same (score) order
    assert 0 < len(ours.kept) < 3000


def test_nms_is_class_aware_and_nmm_builds_envelopes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [8, 0, 14, 10]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 1, 0])
    nms = merge_detections(boxes, scores, classes, method="nms", threshold=0.5)
    assert nms.kept.tolist() == [0, 2, 3]  # box 1 duplicates box 0; box 2 is another class
    assert nms.group.tolist() == [0, 0, 1, 2]
    nmm = merge_detections(boxes, scores, classes, method="nmm", threshold=0.5)
    # Box 3 lies 2/6 inside box 0 (IoS 0.33): its own group. Box 1 joins box 0.
    assert nmm.boxes.tolist() == [[0, 0, 11, 10], [0, 0, 10, 10], [8, 0, 14, 10]]
    assert nmm.scores.tolist() == [0.9, 0.7, 0.6]
    with pytest.raises(ValueError, match="merge method"):
        merge_detections(boxes, scores, classes, method="wbf")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["nms", "nmm"])
def test_merge_scales_to_100k_boxes(method: str) -> None:
    rng = np.random.default_rng(1)
    n = 100_000
    xy = rng.uniform(0, 20_000, (n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(8, 40, (n, 2))])
    dup = boxes[: n // 5] + rng.normal(0, 2, (n // 5, 4))  # duplicates as from tile overlaps
    dup[:, 2:] = np.maximum(dup[:, 2:], dup[:, :2] + 1)
    boxes = np.vstack([boxes, dup])
    scores = rng.random(len(boxes))
    classes = rng.integers(0, 3, len(boxes))
    result = merge_detections(boxes, scores, classes, method=method, threshold=0.5)
    assert n * 0.8 < len(result.boxes) < len(boxes)
    if method == "nms":
        # The NMS invariants: no two kept boxes of a class overlap above the threshold, and
        # every dropped box overlaps a kept, higher-scored box of its class above it.
        kept = result.kept
        i, j = overlapping_pairs(boxes[kept])
        same = classes[kept][i] == classes[kept][j]
        from retrain_lib.geo.boxes import box_iou_pairs

        assert (box_iou_pairs(boxes[kept][i[same]], boxes[kept][j[same]]) <= 0.5).all()
        dropped = np.setdiff1d(np.arange(len(boxes)), kept)
        leader = kept[result.group[dropped]]
        assert (classes[leader] == classes[dropped]).all()
        assert (scores[leader] >= scores[dropped]).all()
        assert (box_iou_pairs(boxes[leader], boxes[dropped]) > 0.5).all()
    else:
        # Every merged box contains all of its members.
        members = result.boxes[result.group]
        assert (members[:, :2] <= boxes[:, :2]).all() and (members[:, 2:] >= boxes[:, 2:]).all()


# ----------------------------------------------------------------------------- a real YOLO


@pytest.fixture(scope="session")
def tiny_yolo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """YOLO11n trained for one epoch at 64 px on a few synthetic chips (~15 s on 2 cores)."""
    from retrain_lib.devtools.synthetic import SceneSpec, write_annotations, write_scene
    from retrain_lib.stages.tiling import tile_scene

    root = tmp_path_factory.mktemp("tiny-yolo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_CONFIG_DIR", str(root / "yolo-config"))
        mp.setenv("YOLO_OFFLINE", "1")
        spec = SceneSpec("train", width=384, height=384, objects_per_class=8, decoys=0, seed=1)
        written = write_scene(root / "train.tif", spec)
        write_annotations(root / "train.geojson", written)
        shard = tile_scene(root / "train.tif", root / "train.geojson", list(CLASSES),
                           root / "chips", TilingConfig(tile_size=128, overlap=0.25,
                                                        background_ratio=0.0, workers=1))
        (root / "data.yaml").write_text(
            f"path: {shard.shard_dir}\ntrain: images\nval: images\nnames:\n  0: car\n"
            "  1: truck\n", encoding="utf-8")
        from ultralytics import YOLO, settings

        previous = settings.get("mlflow")
        settings.update({"mlflow": False})  # no tracking from this throwaway run
        try:
            YOLO("yolo11n.yaml").train(
                data=str(root / "data.yaml"), epochs=1, imgsz=64, batch=8, workers=0,
                plots=False, val=False, amp=False, device="cpu", project=str(root / "runs"),
                name="tiny", exist_ok=True, verbose=False)
        finally:
            settings.update({"mlflow": previous})
    weights = root / "runs" / "tiny" / "weights" / "best.pt"
    assert weights.is_file()
    yield weights


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from retrain_lib.devtools.synthetic import SceneSpec, write_annotations, write_scene

    root = tmp_path_factory.mktemp("tiny-scene")
    spec = SceneSpec("tiny-scene", width=300, height=200, objects_per_class=5, decoys=0,
                     nodata_border=20, seed=3)
    written = write_scene(root / "tiny-scene.tif", spec)
    write_annotations(root / "truth.geojson", written, to_epsg=4326)
    return root / "tiny-scene.tif", root / "truth.geojson"


@pytest.mark.slow
def test_detect_end_to_end_with_a_trained_yolo(tiny_yolo: Path, tiny_scene: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    from retrain_lib.stages.evaluate import evaluate_files

    scene, truth = tiny_scene
    detector = load_detector(tiny_yolo, device="cpu", threads=2)
    assert detector.class_names == CLASSES
    assert detector.ref.name == "tiny" and detector.ref.version.startswith("sha256:")
    options = DetectOptions(tiling=TilingConfig(tile_size=128, overlap=0.25), conf=0.001,
                            batch=4)
    result = detect_scene(scene, detector, options)
    assert result.stats.tiles_total == 3 * 2
    assert len(result.boxes) > 0  # an undertrained model still emits low-score boxes
    assert (result.boxes[:, :2] >= 0).all() and (result.boxes[:, 2] <= 300).all()
    assert (np.diff(result.scores) <= 0).all()
    out = tmp_path / "pred.geojson"
    write_detections(result, out)
    metrics = evaluate_files([out], [truth], [scene], class_names=detector.class_names,
                             conf_threshold=0.001)
    assert metrics.counts.truth == 10 and metrics.counts.pred_total == len(result.boxes)
    assert any("reprojected from EPSG:4326" in note for note in metrics.notes)


@pytest.mark.slow
def test_cli_detect_then_evaluate(tiny_yolo: Path, tiny_scene: tuple[Path, Path],
                                  tmp_path: Path) -> None:
    scene, truth = tiny_scene
    runner = CliRunner()
    pred = tmp_path / "pred.geojson"
    result = runner.invoke(app, ["detect", str(scene), "--model", str(tiny_yolo), "--out",
                                 str(pred), "--tile-size", "128", "--overlap", "0.25",
                                 "--conf", "0.001", "--batch", "4", "--device", "cpu",
                                 "--wgs84", str(tmp_path / "pred_4326.geojson")])
    assert result.exit_code == 0, result.output
    assert "tiles" in result.output and pred.is_file()
    metrics_path = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", "--pred", str(pred), "--truth", str(truth),
                                 "--scene", str(scene), "--out", str(metrics_path),
                                 "--classes", "car,truck"])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics_path.read_text())["counts"]["truth"] == 10


@pytest.mark.slow
def test_cli_detect_reads_a_scene_on_s3_in_place(tiny_yolo: Path, tiny_scene: tuple[Path, Path],
                                                 tmp_path: Path, s3_bucket: str) -> None:
    """``detect s3://bucket/key`` gives what the local file gives, without a download."""
    from retrain_lib.core.storage import open_storage

    scene, _truth = tiny_scene
    open_storage(f"s3://{s3_bucket}").put_file(scene, "scenes/tiny-scene.tif")
    args = ["--model", str(tiny_yolo), "--tile-size", "128", "--overlap", "0.25", "--conf",
            "0.001", "--batch", "4", "--device", "cpu"]
    runner = CliRunner()
    here, there = tmp_path / "local.geojson", tmp_path / "s3.geojson"
    for source, out in ((str(scene), here), (f"s3://{s3_bucket}/scenes/tiny-scene.tif", there)):
        result = runner.invoke(app, ["detect", source, "--out", str(out), *args])
        assert result.exit_code == 0, result.output
    features = [json.loads(p.read_text())["features"] for p in (here, there)]
    assert features[0] == features[1] and features[0]
    missing = runner.invoke(app, ["detect", f"s3://{s3_bucket}/scenes/gone.tif", "--out",
                                  str(tmp_path / "x.geojson"), *args])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert f"s3://{s3_bucket}/scenes/gone.tif: scene object not found" in missing.output


def test_cli_detect_bad_inputs(tmp_path: Path) -> None:
    runner = CliRunner()
    scene = write_blob_scene(tmp_path / "scene.tif", 64, 64, [])
    missing = runner.invoke(app, ["detect", str(scene), "--model", str(tmp_path / "nope.pt"),
                                  "--out", str(tmp_path / "p.geojson")])
    assert missing.exit_code == 2
    assert "nope.pt: model weights file not found" in missing.output
    bad_uri = runner.invoke(app, ["detect", str(scene), "--model", "models:/vehicle",
                                  "--out", str(tmp_path / "p.geojson")])
    assert bad_uri.exit_code == 2 and "models:/<name>@<alias>" in bad_uri.output
    bad_out = runner.invoke(app, ["detect", str(scene), "--model", "m.pt", "--out",
                                  str(tmp_path / "p.csv")])
    assert bad_out.exit_code == 2 and "p.csv" in bad_out.output
    assert all("Traceback" not in r.output for r in (missing, bad_uri, bad_out))


@pytest.mark.slow
def test_model_class_names_must_cover_the_truth(tiny_yolo: Path, tmp_path: Path) -> None:
    from retrain_lib.stages.evaluate import evaluate_files

    detector = load_detector(tiny_yolo, device="cpu")
    geometry = {"type": "Polygon",
                "coordinates": [[[15, 45], [15.001, 45], [15.001, 45.001], [15, 45]]]}
    pred, truth = tmp_path / "pred.geojson", tmp_path / "boats.geojson"
    for path, props in ((pred, {"class": "car", "score": 0.5}), (truth, {"class": "boat"})):
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": props, "geometry": geometry}]}))
    with pytest.raises(InputError, match=r"boats\.geojson: feature 0 has class 'boat', which "
                       r"the model does not know; expected one of car, truck"):
        evaluate_files([pred], [truth], class_names=detector.class_names)


# ----------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_models_uri_resolves_to_the_registered_weights(tiny_yolo: Path, tmp_path: Path
                                                       ) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(tiny_yolo), artifact_path="weights")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("autoretrain-vehicle")
    mv = client.create_model_version("autoretrain-vehicle", source=run.info.artifact_uri,
                                     run_id=run.info.run_id)
    client.set_registered_model_alias("autoretrain-vehicle", "champion", mv.version)

    cache = tmp_path / "cache"
    ref = resolve_model("models:/autoretrain-vehicle@champion", tracking_uri=uri,
                        cache_dir=cache)
    assert (ref.name, ref.version) == ("autoretrain-vehicle", "1")
    assert ref.weights.read_bytes() == tiny_yolo.read_bytes()
    assert ref.weights.is_relative_to(cache)
    by_version = resolve_model("models:/autoretrain-vehicle/1", tracking_uri=uri,
                               cache_dir=cache)
    assert by_version.weights == ref.weights  # cached, not downloaded twice
    detector = load_detector(ref, device="cpu")
    assert detector.class_names == CLASSES
    with pytest.raises(InputError, match="has no alias 'staging'"):
        resolve_model("models:/autoretrain-vehicle@staging", tracking_uri=uri,
                      cache_dir=cache)


def test_weights_file_identity(tmp_path: Path) -> None:
    weights = tmp_path / "runs" / "exp3" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really weights")
    ref = resolve_model(weights)
    assert ref.name == "exp3" and ref.version.startswith("sha256:")
    with pytest.raises(InputError, match=r"best\.pt: cannot load the model weights"):
        load_detector(ref, device="cpu")
    with pytest.raises(ConfigError, match=r"device: got 'gpu'; expected 'cpu'"):
        load_detector(ref, device="gpu")
    assert os.fspath(ref.weights) == str(weights)
