"""Scene-level COCO metrics and per-object matching of detections against ground truth.

Boxes are axis-aligned ``(x_min, y_min, x_max, y_max)`` in scene pixels (columns, rows; see
:mod:`retrain_lib.geo`). Ground-truth polygons (oriented rectangles) are reduced to their
pixel-space envelopes, which is also how YOLO labels are made from them.

Two views of the same data:

- :func:`evaluate_scenes` scores several scenes as *one* COCO dataset with pycocotools
  (mAP@[.5:.95], mAP50, mAP75, AP by object size, AP per class) and adds precision and recall
  at the operating confidence. This is how a frozen test set is scored.
- :func:`match_detections` labels every prediction TP or FP and every truth object TP or FN
  (class-aware, greedy by descending score, IoU at a threshold). Hard-example mining reuses it.

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
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrain_lib.errors import InputError

__all__ = [
    "AreaRanges",
    "MatchResult",
    "Metrics",
    "SceneBoxes",
    "SceneEvalInput",
    "box_iou_pairs",
    "evaluate_files",
    "evaluate_scenes",
    "match_detections",
    "overlapping_pairs",
    "read_scene_boxes",
]

_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
# Feature properties that may hold the class, in the tiler's order of preference.
_CLASS_PROPERTIES = ("class", "class_name", "label", "category")
# Target number of boxes per COCO "image" when a scene is cut into independent groups; small
# enough that pycocotools' quadratic Python loop stays cheap, large enough to limit overhead.
_GROUP_TARGET = 64


# ----------------------------------------------------------------------------- boxes


def _as_boxes(boxes: Any, what: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{what}: expected an (n, 4) array of x_min, y_min, x_max, y_max, "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: boxes must be finite")
    if (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise ValueError(f"{what}: boxes need x_max >= x_min and y_max >= y_min")
    return array


def _as_vector(values: Any, n: int, dtype: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if array.shape[0] != n:
        raise ValueError(f"{what}: expected {n} values (one per box), got {array.shape[0]}")
    return array


def overlapping_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` of boxes whose interiors intersect (positive overlap area).

    Uses a spatial index (an STR-tree), so the cost follows the number of overlapping pairs,
    not the product of the box counts.

    Args:
        boxes_a: ``(n, 4)`` boxes.
        boxes_b: ``(m, 4)`` boxes; ``None`` pairs ``boxes_a`` with itself and returns each
            unordered pair once, with ``i < j``.

    Returns:
        ``(ia, ib)`` integer arrays of equal length.
    """
    import shapely

    self_pairs = boxes_b is None
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = a if boxes_b is None else np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if len(a) == 0 or len(b) == 0:
        return empty
    tree = shapely.STRtree(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))
    # Bounding-box candidates from the tree; exact positive-area overlap checked below.
    ia, ib = tree.query(shapely.box(a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
    ia, ib = ia.astype(np.int64), ib.astype(np.int64)
    if self_pairs:
        keep = ia < ib
        ia, ib = ia[keep], ib[keep]
    width = np.minimum(a[ia, 2], b[ib, 2]) - np.maximum(a[ia, 0], b[ib, 0])
    height = np.minimum(a[ia, 3], b[ib, 3]) - np.maximum(a[ia, 1], b[ib, 1])
    keep = (width > 0) & (height > 0)
    return ia[keep], ib[keep]


def box_iou_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of ``boxes_a[k]`` with ``boxes_b[k]`` for every row ``k`` (same-length arrays)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
             + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


# ----------------------------------------------------------------------------- matching


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Per-object outcome of matching predictions to truth.

    Attributes:
        pred_is_tp: ``(n_pred,)`` True where a prediction matched a truth object.
        pred_match: ``(n_pred,)`` index of the matched truth object, or -1.
        pred_best_iou: ``(n_pred,)`` best IoU with any truth object the prediction may match
            (same class when class-aware), matched or not; 0 when it overlaps none. Tells a
            poorly placed box (high) from a hallucinated one (0).
        truth_is_tp: ``(n_truth,)`` True where a truth object was found.
        truth_match: ``(n_truth,)`` index of the prediction that found it, or -1.
        iou_threshold: The IoU a match needed (``>=``).
    """

    pred_is_tp: np.ndarray
    pred_match: np.ndarray
    pred_best_iou: np.ndarray
    truth_is_tp: np.ndarray
    truth_match: np.ndarray
    iou_threshold: float

    @property
    def tp(self) -> int:
        """Matched pairs."""
        return int(self.pred_is_tp.sum())

    @property
    def fp(self) -> int:
        """Predictions without a match."""
        return int((~self.pred_is_tp).sum())

    @property
    def fn(self) -> int:
        """Truth objects without a match."""
        return int((~self.truth_is_tp).sum())

    @property
    def false_positives(self) -> np.ndarray:
        """Indices of unmatched predictions."""
        return np.flatnonzero(~self.pred_is_tp)

    @property
    def false_negatives(self) -> np.ndarray:
        """Indices of missed truth objects."""
        return np.flatnonzero(~self.truth_is_tp)


def match_detections(pred_boxes: Any, pred_classes: Any, pred_scores: Any, truth_boxes: Any,
                     truth_classes: Any, iou_threshold: float = 0.5, *,
                     class_aware: bool = True) -> MatchResult:
    """Match predictions to truth objects, one to one, greedily by descending score.

    Each prediction, from the highest score down (ties keep input order), takes the unmatched
    truth object of its class with the highest IoU, if that IoU is at least ``iou_threshold``.
    This is the rule pycocotools applies at one IoU threshold.

    Args:
        pred_boxes: ``(n, 4)`` predicted boxes, ``x_min, y_min, x_max, y_max``.
        pred_classes: ``(n,)`` class indexes of the predictions.
        pred_scores: ``(n,)`` confidences.
        truth_boxes: ``(m, 4)`` truth boxes in the same pixel (or map) space.
        truth_classes: ``(m,)`` class indexes of the truth objects.
        iou_threshold: Smallest IoU of a match, in ``(0, 1]``.
        class_aware: Only match equal classes (False: any class).

    Returns:
        The per-object outcome; run time grows with the number of overlapping pairs.

    Raises:
        ValueError: arrays of inconsistent shapes, or a threshold outside ``(0, 1]``.
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold: got {iou_threshold}; expected a value in (0, 1]")
    pred = _as_boxes(pred_boxes, "pred_boxes")
    truth = _as_boxes(truth_boxes, "truth_boxes")
    n_pred, n_truth = len(pred), len(truth)
    pred_cls = _as_vector(pred_classes, n_pred, np.int64, "pred_classes")
    scores = _as_vector(pred_scores, n_pred, np.float64, "pred_scores")
    truth_cls = _as_vector(truth_classes, n_truth, np.int64, "truth_classes")

    ip, it = overlapping_pairs(pred, truth)
    if class_aware:
        same = pred_cls[ip] == truth_cls[it]
        ip, it = ip[same], it[same]
    iou = box_iou_pairs(pred[ip], truth[it])
    best_iou = np.zeros(n_pred, dtype=np.float64)
    np.maximum.at(best_iou, ip, iou)

    # Candidate pairs ordered by prediction rank, then by IoU (best first); one pass then
    # reproduces the greedy rule: a prediction takes its best still-free truth object.
    rank = np.empty(n_pred, dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(n_pred)
    ok = iou >= iou_threshold - 1e-12
    ip, it, iou = ip[ok], it[ok], iou[ok]
    order = np.lexsort((-iou, rank[ip]))
    pred_match = np.full(n_pred, -1, dtype=np.int64)
    truth_match = np.full(n_truth, -1, dtype=np.int64)
    for p, t in zip(ip[order].tolist(), it[order].tolist(), strict=True):
        if pred_match[p] < 0 and truth_match[t] < 0:
            pred_match[p] = t
            truth_match[t] = p
    return MatchResult(pred_is_tp=pred_match >= 0, pred_match=pred_match,
                       pred_best_iou=best_iou, truth_is_tp=truth_match >= 0,
                       truth_match=truth_match, iou_threshold=float(iou_threshold))


# ----------------------------------------------------------------------------- inputs


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
        pred = _as_boxes(self.pred_boxes, f"{where}: pred_boxes")
        truth = _as_boxes(self.truth_boxes, f"{where}: truth_boxes")
        object.__setattr__(self, "pred_boxes", pred)
        object.__setattr__(self, "truth_boxes", truth)
        object.__setattr__(self, "pred_classes", _as_vector(
            self.pred_classes, len(pred), np.int64, f"{where}: pred_classes"))
        object.__setattr__(self, "pred_scores", _as_vector(
            self.pred_scores, len(pred), np.float64, f"{where}: pred_scores"))
        object.__setattr__(self, "truth_classes", _as_vector(
            self.truth_classes, len(truth), np.int64, f"{where}: truth_classes"))


@dataclass(frozen=True)
class AreaRanges:
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

    def __post_init__(self) -> None:
        if not 0 < self.small_max_px < self.medium_max_px:
            raise ValueError(f"area ranges: need 0 < small_max_px < medium_max_px, got "
                             f"{self.small_max_px} and {self.medium_max_px}")

    def coco(self) -> list[list[float]]:
        """pycocotools ``areaRng``: all, small, medium, large."""
        return [[0.0, 1e10], [0.0, self.small_max_px], [self.small_max_px, self.medium_max_px],
                [self.medium_max_px, 1e10]]


# ----------------------------------------------------------------------------- metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


@dataclass(frozen=True)
class Metrics:
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
        n_scenes: Scenes evaluated.
        n_truth: Truth objects.
        n_pred: Predictions at or above ``conf_threshold``.
        n_pred_total: All predictions (used by the COCO metrics).
        tp: Matches at the operating point.
        fp: Unmatched predictions at the operating point.
        fn: Missed truth objects at the operating point.
        iou_threshold: IoU of the operating point.
        conf_threshold: Confidence of the operating point.
        area_ranges: Size bins used, ``None`` when boxes were not in pixels.
        class_names: Classes, in index order.
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
    per_class: Mapping[str, Mapping[str, float | int | None]]
    n_scenes: int
    n_truth: int
    n_pred: int
    n_pred_total: int
    tp: int
    fp: int
    fn: int
    iou_threshold: float
    conf_threshold: float
    area_ranges: AreaRanges | None = field(default_factory=AreaRanges)
    class_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with the keys promotion reads (``map50_95``, ``map50``...)."""
        ranges = None if self.area_ranges is None else {
            "small_max_px": self.area_ranges.small_max_px,
            "medium_max_px": self.area_ranges.medium_max_px}
        return {
            "map50_95": _round(self.map50_95), "map50": _round(self.map50),
            "map75": _round(self.map75), "map_small": _round(self.map_small),
            "map_medium": _round(self.map_medium), "map_large": _round(self.map_large),
            "precision": _round(self.precision), "recall": _round(self.recall),
            "per_class": {name: {k: (_round(v) if isinstance(v, float) else v)
                                 for k, v in values.items()}
                          for name, values in self.per_class.items()},
            "counts": {"scenes": self.n_scenes, "truth": self.n_truth, "pred": self.n_pred,
                       "pred_total": self.n_pred_total, "tp": self.tp, "fp": self.fp,
                       "fn": self.fn},
            "iou_threshold": self.iou_threshold, "conf_threshold": self.conf_threshold,
            "area_ranges": ranges, "classes": list(self.class_names),
            "notes": list(self.notes),
        }


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
    return group_of_comp[labels].astype(np.int64)


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
                    area_ranges: AreaRanges | None = AreaRanges()) -> Metrics:
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
        per_class=per_class, n_scenes=len(scenes), n_truth=n_truth, n_pred=n_pred,
        n_pred_total=n_pred_total, tp=tp, fp=fp, fn=fn, iou_threshold=float(iou_threshold),
        conf_threshold=float(conf_threshold), area_ranges=area_ranges,
        class_names=tuple(class_names))


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True, eq=False)
class SceneBoxes:
    """Boxes read from a GeoJSON file, in scene pixels (or map units without a scene).

    Attributes:
        boxes: ``(n, 4)`` envelopes ``x_min, y_min, x_max, y_max``.
        class_names: ``(n,)`` class name of each feature, as written in the file.
        scores: ``(n,)`` the ``score`` property, or None when the file has no scores.
        feature_index: ``(n,)`` position of each feature in the file.
        crs: CRS the boxes were measured in before any pixel conversion.
        file_crs: CRS of the file itself.
        source: The file.
    """

    boxes: np.ndarray
    class_names: tuple[str, ...]
    scores: np.ndarray | None
    feature_index: np.ndarray
    crs: Any
    file_crs: Any
    source: str


@dataclass(frozen=True)
class _SceneGrid:
    transform: Any
    crs: Any
    source: str


def _scene_grid(scene_path: str | os.PathLike[str]) -> _SceneGrid:
    import rasterio

    source = str(scene_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            dataset = rasterio.open(scene_path)
        with dataset:
            crs, transform = dataset.crs, dataset.transform
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{source}: cannot open the scene raster ({exc})") from None
    if crs is None:
        raise InputError(f"{source}: the scene has no CRS; expected a georeferenced GeoTIFF "
                         "(e.g. EPSG:32633)")
    if transform.is_identity:
        raise InputError(f"{source}: the scene has no geotransform; expected a georeferenced "
                         "GeoTIFF")
    from retrain_lib.geo import to_crs

    return _SceneGrid(transform=transform, crs=to_crs(crs), source=source)


def read_scene_boxes(path: str | os.PathLike[str], *, crs: Any = None,
                     transform: Any = None, scores: bool = False,
                     class_property: str | None = None) -> SceneBoxes:
    """Read a GeoJSON file as boxes, reprojected to ``crs`` and converted to pixels.

    Args:
        path: A FeatureCollection of polygons (truth) or boxes (predictions).
        crs: Reproject into this CRS first (None: keep the file's CRS).
        transform: The scene's affine transform; given, boxes are envelopes in scene pixels.
        scores: Require a numeric ``score`` property on every feature.
        class_property: The property holding the class name; default the first present of
            ``class``, ``class_name``, ``label``, ``category`` (as the tiler reads them).

    Raises:
        InputError: the file is unreadable, or a feature has no class or no valid score
            (the message names the file and the feature).
    """
    import shapely

    from retrain_lib.geo import map_to_pixel, read_geojson, reproject_geometries

    source = str(path)
    features, file_crs = read_geojson(path)
    names: list[str] = []
    values: list[float] = []
    keys = (class_property,) if class_property else _CLASS_PROPERTIES
    for feature in features:
        key = next((k for k in keys if k in feature.properties), keys[0])
        raw = feature.properties.get(key)
        if not isinstance(raw, str) or not raw.strip():
            raise InputError(f"{source}: {feature.describe()}: property {key!r} must be a "
                             f"class name, got {raw!r}")
        names.append(raw.strip())
        if scores:
            score = feature.properties.get("score")
            if (not isinstance(score, int | float) or isinstance(score, bool)
                    or not math.isfinite(score) or not 0 <= score <= 1):
                raise InputError(f"{source}: {feature.describe()}: property 'score' must be a "
                                 f"number in [0, 1], got {score!r}")
            values.append(float(score))
    geoms = np.array([f.geometry for f in features], dtype=object)
    target_crs = file_crs if crs is None else crs
    if len(geoms):
        try:
            geoms = reproject_geometries(geoms, file_crs, target_crs)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        if transform is not None:
            geoms = map_to_pixel(geoms, transform)
    empty = shapely.is_empty(geoms) if len(geoms) else np.zeros(0, dtype=bool)
    if empty.any():
        raise InputError(f"{source}: feature {int(np.flatnonzero(empty)[0])} has an empty "
                         "geometry")
    bounds = shapely.bounds(geoms).reshape(-1, 4) if len(geoms) else np.zeros((0, 4))
    return SceneBoxes(boxes=bounds.astype(np.float64), class_names=tuple(names),
                      scores=np.asarray(values, dtype=np.float64) if scores else None,
                      feature_index=np.array([f.index for f in features], dtype=np.int64),
                      crs=target_crs, file_crs=file_crs, source=source)


def _class_indexes(names: Sequence[str], lookup: Mapping[str, int], source: str,
                   class_names: Sequence[str], what: str) -> np.ndarray:
    indexes = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        k = lookup.get(name.lower())
        if k is None:
            raise InputError(f"{source}: feature {i} has class {name!r}, which the {what} does "
                             f"not know; expected one of {', '.join(class_names)}")
        indexes[i] = k
    return indexes


def evaluate_files(pred_paths: Sequence[str | os.PathLike[str]],
                   truth_paths: Sequence[str | os.PathLike[str]],
                   scene_paths: Sequence[str | os.PathLike[str]] | None = None, *,
                   class_names: Sequence[str] | None = None, iou_threshold: float = 0.5,
                   conf_threshold: float = 0.25,
                   area_ranges: AreaRanges = AreaRanges()) -> Metrics:
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
    from retrain_lib.geo import to_crs

    read: list[tuple[SceneBoxes, SceneBoxes, str]] = []
    notes: list[str] = []
    for i, (pred_path, truth_path) in enumerate(zip(pred_paths, truth_paths, strict=True)):
        if scene_paths is not None:
            grid = _scene_grid(scene_paths[i])
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
                notes.append(f"{boxes.source}: reprojected from {_crs_label(boxes.file_crs)} "
                             f"to {_crs_label(boxes.crs)}")
        read.append((pred, truth, scene_id))
    if scene_paths is None:
        notes.append("no scene given: boxes compared in map units of the predictions' CRS; "
                     "size APs (small/medium/large) need the scene")

    if class_names is None:
        class_names = _infer_classes(read)
    class_names = [str(c) for c in class_names]
    lookup = {name.lower(): k for k, name in enumerate(class_names)}
    if len(lookup) != len(class_names):
        raise InputError(f"class names must be unique (case-insensitive), got {class_names}")
    scenes = []
    for pred, truth, scene_id in read:
        scenes.append(SceneEvalInput(
            scene_id=scene_id, pred_boxes=pred.boxes,
            pred_classes=_class_indexes(pred.class_names, lookup, pred.source, class_names,
                                        "model"),
            pred_scores=pred.scores if pred.scores is not None else np.zeros(0),
            truth_boxes=truth.boxes,
            truth_classes=_class_indexes(truth.class_names, lookup, truth.source,
                                         class_names, "model")))
    metrics = evaluate_scenes(scenes, class_names, iou_threshold=iou_threshold,
                              conf_threshold=conf_threshold,
                              area_ranges=area_ranges if scene_paths is not None else None)
    return replace(metrics, notes=(*metrics.notes, *notes))


def _crs_label(crs: Any) -> str:
    from retrain_lib.geo import to_crs

    authority = to_crs(crs).to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else to_crs(crs).name


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
