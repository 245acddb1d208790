"""Scene-level COCO metrics and per-object matching of detections against ground truth.

Boxes are axis-aligned ``(x_min, y_min, x_max, y_max)`` in scene pixels (columns, rows; see
:mod:`retrain_lib.geo`). Ground-truth polygons (oriented rectangles) are reduced to their
pixel-space envelopes, which is also how YOLO labels are made from them.

Two views of the same data:

- :func:`evaluate_scenes` scores several scenes as *one* COCO dataset with pycocotools
  (mAP@[.5:.95], mAP50, mAP75, AP by object size, AP per class) and adds precision and recall
  at the operating confidence. This is how a frozen test set is scored.
- :func:`retrain_lib.geo.boxes.match_detections` labels every prediction TP or FP and every
  truth object TP or FN (class-aware, greedy by descending score, IoU at a threshold); the
  operating point here and hard-example mining both use it.

Defined values for empty inputs (JSON ``null`` is ``None``, never NaN):

- An AP is ``None`` when no truth object falls in its class/size range: it is undefined, and
  pycocotools leaves such cells out of every mean as well. With truth but no predictions,
  every AP is ``0.0``.
- ``precision`` is ``None`` when there is neither a prediction nor a truth object, ``0.0``
  when there are truth objects but no predictions; ``recall`` is ``None`` without truth.

Speed: pycocotools matches with a pure-Python loop over detections x truth x IoU thresholds
per image, which takes minutes on scenes with thousands of objects. Each scene is therefore
cut into independent COCO "images": groups of boxes that overlap nothing outside the group.
Boxes that do not overlap never match, so the result is the same as one image per scene (up to
the order of detections with exactly equal scores).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydantic import Field, model_validator

from retrain_lib.core.classes import ClassMapper
from retrain_lib.core.errors import InputError
from retrain_lib.core.records import Record
from retrain_lib.geo.annotations import SceneBoxes, read_scene_boxes
from retrain_lib.geo.boxes import as_boxes, as_vector, match_detections, overlapping_pairs
from retrain_lib.geo.crs import crs_name, to_crs

__all__ = [
    "DEFAULT_AREA_RANGES",
    "AreaRanges",
    "MatchCounts",
    "Metrics",
    "SceneEvalInput",
    "evaluate_files",
    "evaluate_scenes",
]

_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
# Target number of boxes per COCO "image" when a scene is cut into independent groups; small
# enough that pycocotools' quadratic Python loop stays cheap, large enough to limit overhead.
_GROUP_TARGET = 64


@dataclass(frozen=True, eq=False)
class SceneEvalInput:
    """Predictions and truth of one scene, as arrays in one pixel space.

    Attributes:
        scene_id: Names the scene in messages.
        pred_boxes: ``(n, 4)`` boxes ``x_min, y_min, x_max, y_max``.
        pred_classes: ``(n,)`` class indexes into the evaluation's class names.
        pred_scores: ``(n,)`` confidences.
        truth_boxes: ``(m, 4)`` boxes.
        truth_classes: ``(m,)`` class indexes.
    """

    scene_id: str
    pred_boxes: np.ndarray
    pred_classes: np.ndarray
    pred_scores: np.ndarray
    truth_boxes: np.ndarray
    truth_classes: np.ndarray

    def __post_init__(self) -> None:
        where = f"scene {self.scene_id!r}"
        pred = as_boxes(self.pred_boxes, f"{where}: pred_boxes")
        truth = as_boxes(self.truth_boxes, f"{where}: truth_boxes")
        object.__setattr__(self, "pred_boxes", pred)
        object.__setattr__(self, "truth_boxes", truth)
        object.__setattr__(self, "pred_classes", as_vector(
            self.pred_classes, len(pred), np.int64, f"{where}: pred_classes"))
        object.__setattr__(self, "pred_scores", as_vector(
            self.pred_scores, len(pred), np.float64, f"{where}: pred_scores"))
        object.__setattr__(self, "truth_classes", as_vector(
            self.truth_classes, len(truth), np.int64, f"{where}: truth_classes"))


class AreaRanges(Record):
    """Object size bins for AP small/medium/large, by box area in scene pixels.

    COCO's bins (32² and 96² px) suit photos; overhead objects are far smaller: a car at
    0.3 m is about 15 x 7 px. The defaults put the edges at 16² and 48² px, i.e. an object is
    small below about 16 x 16 px, large above about 48 x 48 px.

    Attributes:
        small_max_px: Largest area (px²) counted as small.
        medium_max_px: Largest area (px²) counted as medium; larger is large.
    """

    small_max_px: float = 16.0**2
    medium_max_px: float = 48.0**2

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not 0 < self.small_max_px < self.medium_max_px:
            raise ValueError(f"area ranges: need 0 < small_max_px < medium_max_px, got "
                             f"{self.small_max_px} and {self.medium_max_px}")
        return self

    def coco(self) -> list[list[float]]:
        """pycocotools ``areaRng``: all, small, medium, large."""
        return [[0.0, 1e10], [0.0, self.small_max_px], [self.small_max_px, self.medium_max_px],
                [self.medium_max_px, 1e10]]


DEFAULT_AREA_RANGES = AreaRanges()


# ----------------------------------------------------------------------------- metrics


def _round(value: float | int | None) -> float | int | None:
    return round(value, 6) if isinstance(value, float) else value


class MatchCounts(Record):
    """Counts at the operating point (``conf_threshold``, ``iou_threshold``)."""

    scenes: int
    truth: int
    pred: int
    """Predictions at or above ``conf_threshold``."""
    pred_total: int
    """All predictions (the COCO metrics use them all)."""
    tp: int
    fp: int
    fn: int


class Metrics(Record):
    """Scores of a model on a set of scenes. ``None`` marks an undefined value (see module).

    Attributes:
        map50_95: COCO mAP averaged over IoU 0.50:0.95.
        map50: mAP at IoU 0.50.
        map75: mAP at IoU 0.75.
        map_small: mAP@[.5:.95] of small objects (``None`` also when sizes are unknown).
        map_medium: Same for medium objects.
        map_large: Same for large objects.
        precision: TP / (TP + FP) at ``conf_threshold`` and ``iou_threshold``.
        recall: TP / (TP + FN) at the same operating point.
        per_class: Class name -> ``{map50_95, map50, precision, recall, n_truth, n_pred, tp,
            fp, fn}``.
        counts: Scenes, objects and matches at the operating point.
        iou_threshold: IoU of the operating point.
        conf_threshold: Confidence of the operating point.
        area_ranges: Size bins used, ``None`` when boxes were not in pixels.
        classes: Classes, in index order.
        notes: What the evaluation did that a reader should know (e.g. reprojections).
    """

    map50_95: float | None
    map50: float | None
    map75: float | None
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    precision: float | None
    recall: float | None
    per_class: dict[str, dict[str, float | int | None]]
    counts: MatchCounts
    iou_threshold: float
    conf_threshold: float
    area_ranges: AreaRanges | None
    classes: list[str]
    notes: list[str] = Field(default_factory=list)

    def headline(self) -> dict[str, float | None]:
        """The metrics promotion may compare on, by name."""
        return {name: getattr(self, name) for name in (
            "map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
            "precision", "recall")}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, values rounded to 6 decimals (what reports and files record)."""
        data = self.to_json()
        for name in self.headline():
            data[name] = _round(data[name])
        data["per_class"] = {name: {k: _round(v) for k, v in values.items()}
                             for name, values in data["per_class"].items()}
        return data


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _precision(tp: int, n_pred: int, n_truth: int) -> float | None:
    if n_pred == 0:
        return 0.0 if n_truth else None
    return tp / n_pred


def _group_ids(boxes: np.ndarray) -> np.ndarray:
    """Cut one scene's boxes into groups that overlap no box outside their group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ia, ib = overlapping_pairs(boxes)
    graph = coo_matrix((np.ones(len(ia), dtype=np.int8), (ia, ib)), shape=(n, n))
    n_comp, labels = connected_components(graph, directed=False)
    # Pack whole components into groups of about _GROUP_TARGET boxes.
    sizes = np.bincount(labels, minlength=n_comp)
    group_of_comp = (np.cumsum(sizes) - sizes) // _GROUP_TARGET
    groups: np.ndarray = group_of_comp[labels].astype(np.int64)
    return groups


def _coco_precision(scenes: Sequence[SceneEvalInput], n_classes: int,
                    area_ranges: AreaRanges | None) -> np.ndarray:
    """pycocotools' precision array ``[T, R, K, A]`` (-1 where undefined)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict[str, Any]] = []
    gts: list[dict[str, Any]] = []
    dts: list[dict[str, Any]] = []
    image_base = 0
    max_dets = 1
    for scene in scenes:
        groups = _group_ids(np.vstack([scene.truth_boxes, scene.pred_boxes]))
        truth_groups = groups[: len(scene.truth_boxes)] + image_base
        pred_groups = groups[len(scene.truth_boxes):] + image_base
        n_groups = int(groups.max()) + 1 if len(groups) else 0
        images.extend({"id": int(i) + 1} for i in range(image_base, image_base + n_groups))
        if len(pred_groups):
            max_dets = max(max_dets, int(np.bincount(pred_groups).max()))
        for boxes, classes, scores, image_ids, out in (
                (scene.truth_boxes, scene.truth_classes, None, truth_groups, gts),
                (scene.pred_boxes, scene.pred_classes, scene.pred_scores, pred_groups, dts)):
            wh = boxes[:, 2:] - boxes[:, :2]
            for k in range(len(boxes)):
                ann = {"id": len(out) + 1, "image_id": int(image_ids[k]) + 1,
                       "category_id": int(classes[k]) + 1,
                       "bbox": [float(boxes[k, 0]), float(boxes[k, 1]), float(wh[k, 0]),
                                float(wh[k, 1])],
                       "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0}
                if scores is not None:
                    ann["score"] = float(scores[k])
                out.append(ann)
        image_base += n_groups
    if not images:
        images = [{"id": 1}]
    categories = [{"id": k + 1, "name": str(k)} for k in range(n_classes)]

    def _coco(annotations: list[dict[str, Any]]) -> COCO:
        coco = COCO()
        coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
        coco.createIndex()
        return coco

    # pycocotools prints progress on stdout; keep the CLI's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(_coco(gts), _coco(dts), iouType="bbox")
        evaluator.params.iouThrs = _IOU_THRESHOLDS.copy()
        evaluator.params.maxDets = [max_dets]
        if area_ranges is not None:
            evaluator.params.areaRng = area_ranges.coco()
            evaluator.params.areaRngLbl = ["all", "small", "medium", "large"]
        else:
            evaluator.params.areaRng = [[0.0, 1e10]]
            evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    return np.asarray(evaluator.eval["precision"])[..., 0]


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return None if defined.size == 0 else float(defined.mean())


def evaluate_scenes(scenes: Sequence[SceneEvalInput], class_names: Sequence[str], *,
                    iou_threshold: float = 0.5, conf_threshold: float = 0.25,
                    area_ranges: AreaRanges | None = DEFAULT_AREA_RANGES) -> Metrics:
    """Score scenes as one COCO dataset and at one operating point.

    The COCO metrics use every prediction (run detection with a low confidence for them);
    precision and recall count only predictions with score >= ``conf_threshold``, matched
    with :func:`match_detections` at ``iou_threshold``.

    Args:
        scenes: Predictions and truth per scene, classes indexing ``class_names``.
        class_names: Class names in index order.
        iou_threshold: IoU of a match for precision and recall.
        conf_threshold: Operating confidence for precision and recall.
        area_ranges: Size bins in pixels; ``None`` when boxes are not in pixels (size APs
            are then ``None``).

    Raises:
        ValueError: a class index outside ``class_names`` or inconsistent arrays.
    """
    n_classes = len(class_names)
    if n_classes == 0:
        raise ValueError("class_names: at least one class is needed")
    if not 0 <= conf_threshold <= 1:
        raise ValueError(f"conf_threshold: got {conf_threshold}; expected a value in [0, 1]")
    for scene in scenes:
        for what, classes in (("pred_classes", scene.pred_classes),
                              ("truth_classes", scene.truth_classes)):
            if classes.size and (classes.min() < 0 or classes.max() >= n_classes):
                raise ValueError(f"scene {scene.scene_id!r}: {what} must index the "
                                 f"{n_classes} class names, got {sorted(set(classes.tolist()))}")

    precision = _coco_precision(scenes, n_classes, area_ranges)  # [T, R, K, A]
    at50 = int(np.argmin(np.abs(_IOU_THRESHOLDS - 0.5)))
    at75 = int(np.argmin(np.abs(_IOU_THRESHOLDS - 0.75)))
    size_ap: list[float | None] = [None, None, None]
    if area_ranges is not None:
        size_ap = [_mean_defined(precision[:, :, :, a]) for a in (1, 2, 3)]

    # Operating point: counts per class, summed over scenes.
    stats = np.zeros((n_classes, 5), dtype=np.int64)  # n_truth, n_pred, tp, fp, fn
    n_pred_total = 0
    for scene in scenes:
        keep = scene.pred_scores >= conf_threshold
        n_pred_total += len(scene.pred_boxes)
        result = match_detections(scene.pred_boxes[keep], scene.pred_classes[keep],
                                  scene.pred_scores[keep], scene.truth_boxes,
                                  scene.truth_classes, iou_threshold)
        pred_cls = scene.pred_classes[keep]
        stats[:, 0] += np.bincount(scene.truth_classes, minlength=n_classes)
        stats[:, 1] += np.bincount(pred_cls, minlength=n_classes)
        stats[:, 2] += np.bincount(pred_cls[result.pred_is_tp], minlength=n_classes)
        stats[:, 3] += np.bincount(pred_cls[~result.pred_is_tp], minlength=n_classes)
        stats[:, 4] += np.bincount(scene.truth_classes[~result.truth_is_tp],
                                   minlength=n_classes)

    per_class: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(class_names):
        n_truth, n_pred, tp, fp, fn = (int(v) for v in stats[k])
        per_class[name] = {
            "map50_95": _mean_defined(precision[:, :, k, 0]),
            "map50": _mean_defined(precision[at50, :, k, 0]),
            "precision": _precision(tp, n_pred, n_truth), "recall": _ratio(tp, n_truth),
            "n_truth": n_truth, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn,
        }
    n_truth, n_pred, tp, fp, fn = (int(v) for v in stats.sum(axis=0))
    return Metrics(
        map50_95=_mean_defined(precision[:, :, :, 0]),
        map50=_mean_defined(precision[at50, :, :, 0]),
        map75=_mean_defined(precision[at75, :, :, 0]),
        map_small=size_ap[0], map_medium=size_ap[1], map_large=size_ap[2],
        precision=_precision(tp, n_pred, n_truth), recall=_ratio(tp, n_truth),
        per_class=per_class,
        counts=MatchCounts(scenes=len(scenes), truth=n_truth, pred=n_pred,
                           pred_total=n_pred_total, tp=tp, fp=fp, fn=fn),
        iou_threshold=float(iou_threshold), conf_threshold=float(conf_threshold),
        area_ranges=area_ranges, classes=list(class_names), notes=[])


# ----------------------------------------------------------------------------- files



def evaluate_files(pred_paths: Sequence[str | os.PathLike[str]],
                   truth_paths: Sequence[str | os.PathLike[str]],
                   scene_paths: Sequence[str | os.PathLike[str]] | None = None, *,
                   class_names: Sequence[str] | None = None, iou_threshold: float = 0.5,
                   conf_threshold: float = 0.25,
                   area_ranges: AreaRanges = DEFAULT_AREA_RANGES) -> Metrics:
    """Evaluate prediction GeoJSON files against truth GeoJSON files, paired by position.

    With scenes, boxes are compared in each scene's pixels (truth and predictions are first
    reprojected to the scene CRS); size APs use ``area_ranges``. Without scenes, truth is
    reprojected to the predictions' CRS and boxes are compared in its map units: IoU-based
    metrics are the same for north-up scenes, but size APs are ``None``.

    Args:
        pred_paths: Prediction files (features with ``class`` and ``score``).
        truth_paths: Truth files (features with ``class``), one per prediction file.
        scene_paths: Scene rasters, one per prediction file, or None.
        class_names: The model's classes in index order. Given, every truth class must be one
            of them (case-insensitive). Not given, the classes found in the files are used,
            and files that share no class at all are reported as a naming mismatch.
        iou_threshold: IoU of a match at the operating point.
        conf_threshold: Operating confidence.
        area_ranges: Size bins in pixels.

    Raises:
        InputError: unreadable files, unknown classes, a scene without CRS; messages name the
            file.
    """
    if len(pred_paths) != len(truth_paths):
        raise InputError(f"got {len(pred_paths)} prediction file(s) but {len(truth_paths)} "
                         "truth file(s); give one truth file per prediction file")
    if scene_paths is not None and len(scene_paths) != len(pred_paths):
        raise InputError(f"got {len(scene_paths)} scene(s) for {len(pred_paths)} prediction "
                         "file(s); give one scene per prediction file, or none")
    if not pred_paths:
        raise InputError("no prediction files to evaluate")
    from retrain_lib.geo.raster import inspect_scene  # rasterio: only when scenes are given

    read: list[tuple[SceneBoxes, SceneBoxes, str]] = []
    notes: list[str] = []
    for i, (pred_path, truth_path) in enumerate(zip(pred_paths, truth_paths, strict=True)):
        if scene_paths is not None:
            grid = inspect_scene(scene_paths[i])
            pred = read_scene_boxes(pred_path, crs=grid.crs, transform=grid.transform,
                                    scores=True)
            truth = read_scene_boxes(truth_path, crs=grid.crs, transform=grid.transform)
            scene_id = Path(scene_paths[i]).stem
        else:
            pred = read_scene_boxes(pred_path, scores=True)
            truth = read_scene_boxes(truth_path, crs=pred.crs)
            scene_id = Path(pred_path).stem
        for boxes in (pred, truth):
            if to_crs(boxes.file_crs) != to_crs(boxes.crs):
                notes.append(f"{boxes.source}: reprojected from {crs_name(boxes.file_crs)} "
                             f"to {crs_name(boxes.crs)}")
        read.append((pred, truth, scene_id))
    if scene_paths is None:
        notes.append("no scene given: boxes compared in map units of the predictions' CRS; "
                     "size APs (small/medium/large) need the scene")

    if class_names is None:
        class_names = _infer_classes(read)
    class_names = [str(c) for c in class_names]
    if len({name.lower() for name in class_names}) != len(class_names):
        raise InputError(f"class names must be unique (case-insensitive), got {class_names}")
    mapper = ClassMapper(tuple(class_names))
    scenes = []
    for pred, truth, scene_id in read:
        scenes.append(SceneEvalInput(
            scene_id=scene_id, pred_boxes=pred.boxes,
            pred_classes=mapper.indexes(pred.class_names, source=pred.source,
                                        what="the model"),
            pred_scores=pred.scores if pred.scores is not None else np.zeros(0),
            truth_boxes=truth.boxes,
            truth_classes=mapper.indexes(truth.class_names, source=truth.source,
                                         what="the model")))
    metrics = evaluate_scenes(scenes, class_names, iou_threshold=iou_threshold,
                              conf_threshold=conf_threshold,
                              area_ranges=area_ranges if scene_paths is not None else None)
    return metrics.model_copy(update={"notes": [*metrics.notes, *notes]})


def _infer_classes(read: Sequence[tuple[SceneBoxes, SceneBoxes, str]]) -> list[str]:
    """Classes seen in the files (first spelling wins); a disjoint naming is an error."""
    seen: dict[str, str] = {}
    pred_keys: set[str] = set()
    truth_keys: set[str] = set()
    for pred, truth, _ in read:
        for names, keys in ((pred.class_names, pred_keys), (truth.class_names, truth_keys)):
            for name in names:
                seen.setdefault(name.lower(), name)
                keys.add(name.lower())
    if pred_keys and truth_keys and not pred_keys & truth_keys:
        pred_files = ", ".join(sorted({p.source for p, _, _ in read}))
        truth_files = ", ".join(sorted({t.source for _, t, _ in read}))
        raise InputError(
            f"{pred_files}: predicted classes ({', '.join(sorted(seen[k] for k in pred_keys))})"
            f" share no class with the truth in {truth_files} "
            f"({', '.join(sorted(seen[k] for k in truth_keys))}); was the model trained for "
            "these classes?")
    if not seen:
        raise InputError(f"{read[0][0].source}: no predictions and no truth objects, so the "
                         "classes are unknown; pass the model's class names")
    return sorted(seen.values(), key=str.lower)

