"""Axis-aligned boxes: overlaps, IoU, one-to-one matching and duplicate merging.

Boxes are ``(x_min, y_min, x_max, y_max)`` rows, in scene pixels (columns, rows; see
:mod:`retrain_lib.geo.crs`) or any other planar unit. Every pairwise operation finds its
candidate pairs with a spatial index, so its cost follows the number of overlapping pairs,
not the product of the box counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import shapely

__all__ = [
    "MatchResult",
    "MergeMethod",
    "MergeResult",
    "as_boxes",
    "as_vector",
    "box_iou_pairs",
    "match_detections",
    "merge_detections",
    "overlapping_pairs",
]

MergeMethod = Literal["nms", "nmm", "none"]


def as_boxes(boxes: Any, what: str) -> np.ndarray:
    """An ``(n, 4)`` float array of valid boxes; ValueError names ``what`` otherwise."""
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


def as_vector(values: Any, n: int, dtype: Any, what: str) -> np.ndarray:
    """A flat array of ``n`` values (one per box); ValueError names ``what`` otherwise."""
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
    pred = as_boxes(pred_boxes, "pred_boxes")
    truth = as_boxes(truth_boxes, "truth_boxes")
    n_pred, n_truth = len(pred), len(truth)
    pred_cls = as_vector(pred_classes, n_pred, np.int64, "pred_classes")
    scores = as_vector(pred_scores, n_pred, np.float64, "pred_scores")
    truth_cls = as_vector(truth_classes, n_truth, np.int64, "truth_classes")

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
class MergeResult:
    """Boxes after a cross-tile merge.

    Attributes:
        boxes: ``(k, 4)`` merged boxes (``x_min, y_min, x_max, y_max``).
        scores: ``(k,)`` scores (the best of each merged group).
        classes: ``(k,)`` classes (that of the best box of each group).
        kept: ``(k,)`` index of each group's best box in the input.
        group: ``(n,)`` for every input box, the output row it went into.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    kept: np.ndarray
    group: np.ndarray


def merge_detections(boxes: Any, scores: Any, classes: Any, *, method: MergeMethod = "nms",
                     threshold: float = 0.5, class_aware: bool = True) -> MergeResult:
    """Merge duplicate detections of the same objects (e.g. from overlapping tiles).

    Greedy, by descending score (ties keep input order):

    - ``"nms"``: a box is dropped when a kept, higher-scored box of its class overlaps it
      with IoU > ``threshold``.
    - ``"nmm"``: each kept box absorbs every remaining box of its class whose intersection
      over the smaller of the two areas (IoS) > ``threshold``; the merged box is the envelope
      of the group, its score the group's best (SAHI's greedy NMM).
    - ``"none"``: keep everything.

    Candidate pairs come from a spatial index, so the cost follows the number of overlapping
    pairs rather than n²; 100,000 boxes take about a second.

    Raises:
        ValueError: bad shapes, an unknown method, or a threshold outside ``(0, 1]``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(s) != n or len(c) != n:
        raise ValueError(f"merge_detections: {n} boxes but {len(s)} scores and {len(c)} classes")
    if method not in ("nms", "nmm", "none"):
        raise ValueError(f"merge method: got {method!r}; expected 'nms', 'nmm' or 'none'")
    if not 0 < threshold <= 1:
        raise ValueError(f"merge threshold: got {threshold}; expected a value in (0, 1]")
    order = np.argsort(-s, kind="stable")
    if method == "none" or n < 2:
        return MergeResult(b[order], s[order], c[order], order, _inverse(order))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)

    i, j = overlapping_pairs(b)
    if class_aware:
        same = c[i] == c[j]
        i, j = i[same], j[same]
    inter = ((np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]))
             * (np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1])))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # IoU for NMS; intersection over the smaller box for NMM (a fragment inside a whole box).
    denominator = (area[i] + area[j] - inter) if method == "nms" else np.minimum(area[i], area[j])
    with np.errstate(divide="ignore", invalid="ignore"):
        metric = np.where(denominator > 0, inter / denominator, 1.0)
    hit = metric > threshold
    i, j = i[hit], j[hit]
    # Orient each pair (higher-ranked, lower-ranked) and visit pairs by the higher one's rank:
    # when a pair is reached, the fate of its higher-ranked box is already final.
    swap = rank[i] > rank[j]
    hi = np.where(swap, j, i)
    lo = np.where(swap, i, j)
    visit = np.lexsort((rank[lo], rank[hi]))
    owner = np.full(n, -1, dtype=np.int64)  # -1: leads its own group
    for h, low in zip(hi[visit].tolist(), lo[visit].tolist(), strict=True):
        if owner[h] < 0 and owner[low] < 0:
            owner[low] = h
    leaders = order[owner[order] < 0]  # by descending score
    row_of_leader = np.full(n, -1, dtype=np.int64)
    row_of_leader[leaders] = np.arange(len(leaders))
    group = np.where(owner < 0, row_of_leader, row_of_leader[np.maximum(owner, 0)])
    merged = b[leaders].copy()
    if method == "nmm":
        np.minimum.at(merged[:, 0], group, b[:, 0])
        np.minimum.at(merged[:, 1], group, b[:, 1])
        np.maximum.at(merged[:, 2], group, b[:, 2])
        np.maximum.at(merged[:, 3], group, b[:, 3])
    return MergeResult(merged, s[leaders], c[leaders], leaders, group)


def _inverse(order: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse

