"""COCO metrics and per-object matching, checked by hand and against pycocotools itself."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.errors import InputError
from retrain_lib.geo.boxes import match_detections
from retrain_lib.stages.evaluate import AreaRanges, SceneEvalInput, evaluate_files, evaluate_scenes

CLASSES = ["car", "truck"]
METRIC_KEYS = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
               "per_class", "precision", "recall")


def scene(pred: list[list[float]], pred_cls: list[int], scores: list[float],
          truth: list[list[float]], truth_cls: list[int], scene_id: str = "s") -> SceneEvalInput:
    return SceneEvalInput(scene_id, np.array(pred, float).reshape(-1, 4), np.array(pred_cls),
                          np.array(scores, float), np.array(truth, float).reshape(-1, 4),
                          np.array(truth_cls))


def random_scene(rng: np.random.Generator, n: int, size: float, scene_id: str,
                 n_classes: int = 3) -> SceneEvalInput:
    """Truth boxes of 4..70 px; predictions are jittered copies of most, plus clutter."""
    xy = rng.uniform(0, size, (n, 2))
    truth = np.hstack([xy, xy + rng.uniform(4, 70, (n, 2))])
    truth_cls = rng.integers(0, n_classes, n)
    found = rng.random(n) < 0.8
    jitter = truth[found] + rng.normal(0, 3, (int(found.sum()), 4))
    jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
    n_fp = n // 4
    xy_fp = rng.uniform(0, size, (n_fp, 2))
    clutter = np.hstack([xy_fp, xy_fp + rng.uniform(4, 70, (n_fp, 2))])
    cls = np.concatenate([truth_cls[found], rng.integers(0, n_classes, n_fp)])
    # Some predictions take the wrong class.
    wrong = rng.random(len(cls)) < 0.05
    cls[wrong] = (cls[wrong] + 1) % n_classes
    pred = np.vstack([jitter, clutter])
    return SceneEvalInput(scene_id, pred, cls, rng.random(len(pred)), truth, truth_cls)


def pycocotools_direct(scenes: list[SceneEvalInput], n_classes: int,
                       ranges: AreaRanges) -> np.ndarray:
    """Reference: pycocotools with one COCO image per scene, the textbook way."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1} for i in range(len(scenes))]
    categories = [{"id": k + 1, "name": str(k)} for k in range(n_classes)]
    gts, dts = [], []
    for i, s in enumerate(scenes):
        for b, c in zip(s.truth_boxes, s.truth_classes, strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                        "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, c, sc in zip(s.pred_boxes, s.pred_classes, s.pred_scores, strict=True):
            dts.append({"image_id": i + 1, "category_id": int(c) + 1,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(sc)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": categories, "annotations": gts}
        gt.createIndex()
        dt = gt.loadRes(dts)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [10_000]
        ev.params.areaRng = ranges.coco()
        ev.params.areaRngLbl = ["all", "small", "medium", "large"]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][..., 0]  # [T, R, K, A]


def mean_defined(a: np.ndarray) -> float | None:
    return float(a[a > -1].mean()) if (a > -1).any() else None


# ----------------------------------------------------------------------------- hand cases


def test_perfect_predictions_score_one() -> None:
    truth = [[10, 10, 20, 18], [40, 40, 90, 100], [200, 5, 214, 12]]
    s = scene(truth, [0, 1, 0], [0.9, 0.8, 0.7], truth, [0, 1, 0])
    m = evaluate_scenes([s], CLASSES)
    assert m.map50_95 == pytest.approx(1.0)
    assert m.map50 == pytest.approx(1.0) and m.map75 == pytest.approx(1.0)
    assert m.precision == 1.0 and m.recall == 1.0
    assert (m.counts.tp, m.counts.fp, m.counts.fn) == (3, 0, 0)
    # 10x8 and 14x7 px are small (< 16x16), 50x60 px is large (> 48x48); no medium object.
    assert m.map_small == pytest.approx(1.0) and m.map_large == pytest.approx(1.0)
    assert m.map_medium is None
    assert m.per_class["truck"]["map50_95"] == pytest.approx(1.0)


def test_no_predictions_score_zero() -> None:
    s = scene([], [], [], [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])
    m = evaluate_scenes([s], CLASSES)
    assert m.map50_95 == 0.0 and m.map50 == 0.0 and m.map75 == 0.0
    assert m.precision == 0.0 and m.recall == 0.0
    assert (m.counts.pred, m.counts.fn) == (0, 2)


def test_empty_truth_and_predictions_are_defined_and_json_clean() -> None:
    m = evaluate_scenes([scene([], [], [], [], [])], CLASSES)
    d = m.to_dict()
    assert all(key in d for key in METRIC_KEYS)
    assert d["map50_95"] is None and d["precision"] is None and d["recall"] is None
    assert d["per_class"]["car"]["map50"] is None
    json.dumps(d, allow_nan=False)  # no NaN anywhere


def test_predictions_without_truth_are_all_false_positives() -> None:
    m = evaluate_scenes([scene([[0, 0, 5, 5]], [0], [0.9], [], [])], CLASSES)
    assert m.map50_95 is None  # undefined without truth, as in pycocotools
    assert m.precision == 0.0 and m.recall is None and m.counts.fp == 1


def test_shifted_box_follows_its_iou() -> None:
    # Shifting a 10x10 box by 2 px gives IoU 80/120 = 2/3: a match at IoU 0.50..0.65
    # (4 of the 10 COCO thresholds), a miss at 0.70..0.95.
    s = scene([[2, 0, 12, 10]], [0], [0.9], [[0, 0, 10, 10]], [0])
    m = evaluate_scenes([s], CLASSES)
    assert m.map50 == pytest.approx(1.0)
    assert m.map75 == 0.0
    assert m.map50_95 == pytest.approx(0.4)
    assert evaluate_scenes([s], CLASSES, iou_threshold=0.66).counts.tp == 1
    low = evaluate_scenes([s], CLASSES, iou_threshold=0.67)
    assert (low.counts.tp, low.counts.fp, low.counts.fn) == (0, 1, 1)
    assert low.precision == 0.0 and low.recall == 0.0


def test_operating_confidence_filters_precision_and_recall_only() -> None:
    truth = [[0, 0, 10, 10], [50, 50, 60, 60]]
    s = scene(truth, [0, 0], [0.9, 0.1], truth, [0, 0])
    m = evaluate_scenes([s], CLASSES, conf_threshold=0.5)
    assert m.map50 == pytest.approx(1.0)  # COCO uses every prediction
    assert (m.counts.pred, m.counts.pred_total, m.counts.tp, m.counts.fn) == (1, 2, 1, 1)
    assert m.precision == 1.0 and m.recall == 0.5


def test_area_ranges_are_configurable() -> None:
    truth = [[0, 0, 20, 20]]  # 400 px²: medium by default, small with a 25x25 px bound
    s = scene(truth, [0], [0.9], truth, [0])
    assert evaluate_scenes([s], CLASSES).map_medium == pytest.approx(1.0)
    wide = evaluate_scenes([s], CLASSES, area_ranges=AreaRanges(small_max_px=625,
                                                                medium_max_px=10_000))
    assert wide.map_small == pytest.approx(1.0) and wide.map_medium is None
    with pytest.raises(ValueError, match="small_max_px"):
        AreaRanges(small_max_px=100, medium_max_px=50)


def test_scenes_are_separate_images() -> None:
    # The same pixel box in two scenes is not a match across scenes.
    a = scene([], [], [], [[0, 0, 10, 10]], [0], scene_id="a")
    b = scene([[0, 0, 10, 10]], [0], [0.9], [], [], scene_id="b")
    m = evaluate_scenes([a, b], CLASSES)
    assert m.map50 == 0.0 and (m.counts.tp, m.counts.fp, m.counts.fn) == (0, 1, 1)
    assert m.counts.scenes == 2


# ----------------------------------------------------------------------------- pycocotools


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pycocotools_run_directly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # 300 boxes per scene: several groups per scene, so the grouping is exercised.
    scenes = [random_scene(rng, 300, 900, f"s{i}") for i in range(3)]
    ranges = AreaRanges()
    reference = pycocotools_direct(scenes, 3, ranges)
    m = evaluate_scenes(scenes, ["a", "b", "c"], area_ranges=ranges)
    assert m.map50_95 == pytest.approx(mean_defined(reference[:, :, :, 0]), abs=1e-12)
    assert m.map50 == pytest.approx(mean_defined(reference[0, :, :, 0]), abs=1e-12)
    assert m.map75 == pytest.approx(mean_defined(reference[5, :, :, 0]), abs=1e-12)
    assert m.map_small == pytest.approx(mean_defined(reference[:, :, :, 1]), abs=1e-12)
    assert m.map_medium == pytest.approx(mean_defined(reference[:, :, :, 2]), abs=1e-12)
    assert m.map_large == pytest.approx(mean_defined(reference[:, :, :, 3]), abs=1e-12)
    for k, name in enumerate(["a", "b", "c"]):
        assert m.per_class[name]["map50_95"] == pytest.approx(
            mean_defined(reference[:, :, k, 0]), abs=1e-12)
    assert 0.2 < m.map50 < 0.95  # a real mix of hits and misses


# ----------------------------------------------------------------------------- matcher


def brute_force_match(pred: np.ndarray, pred_cls: np.ndarray, scores: np.ndarray,
                      truth: np.ndarray, truth_cls: np.ndarray, thr: float) -> np.ndarray:
    """Reference greedy matcher, O(n*m), straight from the definition."""
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    taken = np.zeros(len(truth), bool)
    match = np.full(len(pred), -1)
    for p in np.argsort(-scores, kind="stable"):
        best, best_iou = -1, thr
        for t in range(len(truth)):
            if taken[t] or truth_cls[t] != pred_cls[p]:
                continue
            value = iou(pred[p], truth[t])
            if value >= best_iou and (best < 0 or value > best_iou):
                best, best_iou = t, value
        if best >= 0:
            taken[best] = True
            match[p] = best
    return match


def test_matcher_agrees_with_brute_force() -> None:
    rng = np.random.default_rng(3)
    s = random_scene(rng, 200, 400, "m")
    result = match_detections(s.pred_boxes, s.pred_classes, s.pred_scores, s.truth_boxes,
                              s.truth_classes, 0.5)
    expected = brute_force_match(s.pred_boxes, s.pred_classes, s.pred_scores, s.truth_boxes,
                                 s.truth_classes, 0.5)
    np.testing.assert_array_equal(result.pred_match, expected)
    assert result.tp == int((expected >= 0).sum())
    assert result.tp + result.fn == len(s.truth_boxes)
    np.testing.assert_array_equal(result.truth_match[result.pred_match[result.pred_is_tp]],
                                  np.flatnonzero(result.pred_is_tp))


def test_matcher_greedy_by_score_and_class_aware() -> None:
    truth = np.array([[0, 0, 10, 10]], float)
    preds = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], float)
    result = match_detections(preds, [0, 0, 1], [0.5, 0.9, 0.99], truth, [0], 0.5)
    # The wrong-class box is never a match; of the two right-class ones the higher score
    # wins, even though the other overlaps better.
    assert result.pred_is_tp.tolist() == [False, True, False]
    assert result.truth_match.tolist() == [1]
    assert result.false_positives.tolist() == [0, 2]
    assert result.pred_best_iou[0] == pytest.approx(1.0)  # a duplicate, not a hallucination
    assert result.pred_best_iou[2] == 0.0  # no truth of its class
    agnostic = match_detections(preds, [0, 0, 1], [0.5, 0.9, 0.99], truth, [0], 0.5,
                                class_aware=False)
    assert agnostic.pred_is_tp.tolist() == [False, False, True]


def test_matcher_takes_the_best_free_truth() -> None:
    truth = np.array([[0, 0, 10, 10], [3, 0, 13, 10]], float)
    preds = np.array([[2, 0, 12, 10], [0, 0, 10, 10]], float)
    result = match_detections(preds, [0, 0], [0.9, 0.8], truth, [0, 0], 0.3)
    # The first prediction overlaps truth 1 better (IoU 0.82 vs 0.67); the second then
    # takes truth 0.
    assert result.pred_match.tolist() == [1, 0]
    assert result.fn == 0


def test_matcher_rejects_bad_shapes_and_thresholds() -> None:
    with pytest.raises(ValueError, match="pred_scores"):
        match_detections([[0, 0, 1, 1]], [0], [0.5, 0.6], [], [])
    with pytest.raises(ValueError, match="iou_threshold"):
        match_detections([], [], [], [], [], 0.0)
    with pytest.raises(ValueError, match="x_max >= x_min"):
        match_detections([[5, 0, 1, 1]], [0], [0.5], [], [])
    empty = match_detections([], [], [], [[0, 0, 1, 1]], [0])
    assert (empty.tp, empty.fp, empty.fn) == (0, 0, 1)


# ----------------------------------------------------------------------------- files


def write_geojson(path: Path, boxes: list[tuple[float, float, float, float]],
                  classes: list[str], scores: list[float] | None = None,
                  epsg: int | None = 32633) -> Path:
    features = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        props: dict[str, object] = {"class": classes[i]}
        if scores is not None:
            props["score"] = scores[i]
        features.append({"type": "Feature", "properties": props, "geometry": {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}})
    doc: dict[str, object] = {"type": "FeatureCollection", "features": features}
    if epsg is not None:
        doc["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


ORIGIN = (500_000.0, 5_000_000.0)  # top-left of the test scene, UTM 33N, 0.5 m pixels


def write_scene(path: Path, *, crs: str | None = "EPSG:32633") -> Path:
    import rasterio
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(*ORIGIN, 0.5, 0.5))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((3, 64, 64), 100, np.uint8))
    return path


def map_box(col0: float, row0: float, col1: float, row1: float) -> tuple[float, ...]:
    """Pixel box of the test scene -> map box (x_min, y_min, x_max, y_max)."""
    return (ORIGIN[0] + col0 * 0.5, ORIGIN[1] - row1 * 0.5, ORIGIN[0] + col1 * 0.5,
            ORIGIN[1] - row0 * 0.5)


def test_files_in_scene_pixels_with_truth_in_wgs84(tmp_path: Path) -> None:
    import pyproj

    scene_path = write_scene(tmp_path / "scene.tif")
    boxes = [map_box(2, 2, 12, 8), map_box(30, 30, 60, 50)]
    pred = write_geojson(tmp_path / "pred.geojson", boxes, ["car", "truck"], [0.9, 0.8])
    to_lonlat = pyproj.Transformer.from_crs(32633, 4326, always_xy=True)
    lonlat = []
    for x0, y0, x1, y1 in boxes:
        (a, c), (b, d) = to_lonlat.transform([x0, x1], [y0, y1])
        lonlat.append((a, b, c, d))
    truth = write_geojson(tmp_path / "truth.geojson", lonlat, ["Car", "truck"], epsg=None)
    m = evaluate_files([pred], [truth], [scene_path])
    assert m.map50_95 == pytest.approx(1.0, abs=1e-6)
    assert m.map_small == pytest.approx(1.0, abs=1e-6)  # 10x6 px
    assert m.map_large is None  # 30x20 px = 600 px² is medium
    assert any("reprojected from EPSG:4326 to EPSG:32633" in n for n in m.notes)
    # Without the scene: compared in map units; IoU metrics agree, size APs are unknown.
    no_scene = evaluate_files([pred], [truth])
    assert no_scene.map50_95 == pytest.approx(1.0, abs=1e-6)
    assert no_scene.map_small is None and no_scene.area_ranges is None


def test_files_shifted_prediction_in_pixels(tmp_path: Path) -> None:
    scene_path = write_scene(tmp_path / "scene.tif")
    pred = write_geojson(tmp_path / "p.geojson", [map_box(2, 0, 12, 10)], ["car"], [0.5])
    truth = write_geojson(tmp_path / "t.geojson", [map_box(0, 0, 10, 10)], ["car"])
    m = evaluate_files([pred], [truth], [scene_path], class_names=CLASSES)
    assert m.map50_95 == pytest.approx(0.4)
    assert m.per_class["truck"]["map50"] is None  # no truck in the truth


def test_empty_prediction_file_is_valid(tmp_path: Path) -> None:
    pred = write_geojson(tmp_path / "p.geojson", [], [], [])
    truth = write_geojson(tmp_path / "t.geojson", [map_box(0, 0, 10, 10)], ["car"])
    m = evaluate_files([pred], [truth], class_names=CLASSES)
    assert m.map50 == 0.0 and m.recall == 0.0 and m.precision == 0.0


def test_scene_without_crs_is_an_error_naming_it(tmp_path: Path) -> None:
    scene_path = write_scene(tmp_path / "nocrs.tif", crs=None)
    pred = write_geojson(tmp_path / "p.geojson", [map_box(0, 0, 10, 10)], ["car"], [0.5])
    with pytest.raises(InputError, match=r"nocrs\.tif: the raster has no CRS"):
        evaluate_files([pred], [pred], [scene_path])


def test_truth_class_unknown_to_the_model(tmp_path: Path) -> None:
    pred = write_geojson(tmp_path / "p.geojson", [map_box(0, 0, 10, 10)], ["car"], [0.5])
    truth = write_geojson(tmp_path / "truth.geojson", [map_box(0, 0, 10, 10)], ["boat"])
    with pytest.raises(InputError, match=r"truth\.geojson: feature 0 has class 'boat'.*car, "
                       "truck"):
        evaluate_files([pred], [truth], class_names=CLASSES)


def test_disjoint_class_names_are_reported(tmp_path: Path) -> None:
    pred = write_geojson(tmp_path / "pred.geojson", [map_box(0, 0, 10, 10)], ["0"], [0.5])
    truth = write_geojson(tmp_path / "truth.geojson", [map_box(0, 0, 10, 10)], ["car"])
    with pytest.raises(InputError, match=r"pred\.geojson: predicted classes \(0\) share no "
                       r"class with the truth in .*truth\.geojson \(car\)"):
        evaluate_files([pred], [truth])


def test_prediction_without_score_names_file_and_feature(tmp_path: Path) -> None:
    pred = write_geojson(tmp_path / "pred.geojson", [map_box(0, 0, 10, 10)] * 2,
                         ["car", "car"], [0.5, 0.5])
    doc = json.loads(pred.read_text())
    doc["features"][1]["properties"]["score"] = "high"
    pred.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"pred\.geojson: feature 1: property 'score'"):
        evaluate_files([pred], [pred])


def test_cli_writes_metrics_and_reports_bad_input(tmp_path: Path) -> None:
    scene_path = write_scene(tmp_path / "scene.tif")
    pred = write_geojson(tmp_path / "p.geojson", [map_box(2, 0, 12, 10)], ["car"], [0.9])
    truth = write_geojson(tmp_path / "t.geojson", [map_box(0, 0, 10, 10)], ["car"])
    out = tmp_path / "metrics" / "m.json"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--pred", str(pred), "--truth", str(truth),
                                 "--scene", str(scene_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert all(key in data for key in METRIC_KEYS)
    assert data["map50_95"] == pytest.approx(0.4)
    assert "mAP50-95" in result.output
    bad = runner.invoke(app, ["evaluate", "--pred", str(pred), "--truth",
                              str(tmp_path / "missing.geojson"), "--out", str(out)])
    assert bad.exit_code == 2
    assert "missing.geojson" in bad.output and "Traceback" not in bad.output
