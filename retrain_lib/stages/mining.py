"""Hard-example mining: the champion's mistakes on new scenes become training chips.

For each newly annotated scene, the champion's detections (stored by the detect DAG for that
exact model version, or produced now) are matched to the new truth with
:func:`retrain_lib.geo.boxes.match_detections`:

- a **false positive** (a decoy, a shadow, a look-alike) becomes a hard-negative chip centred
  on it; true objects inside that chip stay labelled;
- a **false negative** becomes a hard-positive chip centred on the missed object.

Per scene, the highest-confidence false positives and the largest misses come first, taken
in turn, up to ``mining.max_per_scene``; ``mining.max_per_cycle`` caps the cycle. A candidate
within ``mining.dedup_radius_m`` of a hard chip of an earlier cycle, or of one already taken
in this cycle, is a duplicate and dropped. Chips are written by the tiler (same shard format,
same labelling rules), with each tile's reason, score, class, erring model version and map
location in the tile index, plus a provenance manifest per cycle.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import shapely

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.io import atomic_write_text
from retrain_lib.core.records import Record
from retrain_lib.geo.annotations import read_scene_boxes
from retrain_lib.geo.boxes import match_detections
from retrain_lib.geo.crs import WGS84, reproject_geometries
from retrain_lib.geo.windows import PixelWindow

if TYPE_CHECKING:
    from retrain_lib.geo.raster import SceneInfo

__all__ = [
    "HardExample",
    "MiningResult",
    "SceneToMine",
    "mine_hard_examples",
    "mine_scene",
    "select_hard_examples",
]

Reason = Literal["false_positive", "false_negative"]


class HardExample(Record):
    """One mistake of the champion, and the chip that teaches it."""

    scene_id: str
    reason: Reason
    class_name: str
    score: float | None
    model_version: str
    box_px: tuple[float, float, float, float]
    center_map: tuple[float, float]
    center_lonlat: tuple[float, float]
    window: tuple[int, int, int, int]
    """``col_off, row_off, width, height`` of the chip."""
    crs: str

    @property
    def area_px(self) -> float:
        """Area of the box in pixels²."""
        x0, y0, x1, y1 = self.box_px
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class MiningResult:
    """What mining produced for one scene or a whole cycle."""

    examples: tuple[HardExample, ...]
    shard_dirs: tuple[Path, ...] = ()
    duplicates: int = 0
    capped: int = 0
    candidates: Mapping[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Hard chips by reason."""
        counts = Counter(e.reason for e in self.examples)
        return {"false_positive": counts.get("false_positive", 0),
                "false_negative": counts.get("false_negative", 0)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as the mining manifest records it."""
        return {"counts": self.counts, "duplicates": self.duplicates, "capped": self.capped,
                "candidates": dict(self.candidates),
                "shard_dirs": [str(p) for p in self.shard_dirs],
                "examples": [e.to_json() for e in self.examples]}


def _centred_window(cx: float, cy: float, tile_px: int, width: int, height: int
                    ) -> tuple[int, int, int, int]:
    w, h = min(tile_px, width), min(tile_px, height)
    col = round(float(cx) - w / 2)
    row = round(float(cy) - h / 2)
    col = min(max(col, 0), width - w)
    row = min(max(row, 0), height - h)
    return col, row, w, h


def _interleave(first: list[int], second: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in range(max(len(first), len(second))):
        if i < len(first):
            out.append((0, first[i]))
        if i < len(second):
            out.append((1, second[i]))
    return out


def select_hard_examples(*, scene: SceneInfo, classes: Sequence[str], pred_boxes: np.ndarray,
                         pred_classes: np.ndarray, pred_scores: np.ndarray,
                         truth_boxes: np.ndarray, truth_classes: np.ndarray,
                         tile_px: int, model_version: str, iou_threshold: float = 0.5,
                         conf_threshold: float = 0.25, max_examples: int = 200,
                         dedup_radius_m: float = 10.0,
                         taken_centres: Sequence[tuple[float, float]] = (),
                         ) -> tuple[list[HardExample], int, int, dict[str, int]]:
    """Pick hard examples in one scene (pure function: nothing is written).

    Args:
        scene: The scene (size, transform, CRS, scene id).
        classes: Class names in model index order.
        pred_boxes, pred_classes, pred_scores: The champion's detections, scene pixels.
        truth_boxes, truth_classes: The new annotations, scene pixels.
        tile_px: Chip edge in pixels.
        model_version: The erring model, recorded on each example.
        iou_threshold: IoU of a correct detection.
        conf_threshold: Detections below this score are ignored.
        max_examples: At most this many examples.
        dedup_radius_m: Minimum distance between hard chip centres, in map units.
        taken_centres: Centres (scene CRS) of hard chips already taken, this cycle or before.

    Returns:
        ``(examples, duplicates, capped, candidates)``: the examples, the candidates dropped
        as duplicates, those dropped by the cap, and candidate counts by reason.
    """
    keep = pred_scores >= conf_threshold
    pred_boxes, pred_classes, pred_scores = pred_boxes[keep], pred_classes[keep], \
        pred_scores[keep]
    match = match_detections(pred_boxes, pred_classes, pred_scores, truth_boxes, truth_classes,
                             iou_threshold)
    fps = match.false_positives.tolist()
    fns = match.false_negatives.tolist()
    fps.sort(key=lambda i: -pred_scores[i])
    truth_area = (truth_boxes[:, 2] - truth_boxes[:, 0]) * (truth_boxes[:, 3] - truth_boxes[:, 1])
    fns.sort(key=lambda i: -truth_area[i])
    candidates = {"false_positive": len(fps), "false_negative": len(fns)}

    taken = [tuple(c) for c in taken_centres]
    examples: list[HardExample] = []
    windows: set[tuple[int, int, int, int]] = set()
    duplicates = capped = 0
    transform = scene.transform
    for kind, i in _interleave(fps, fns):
        box = pred_boxes[i] if kind == 0 else truth_boxes[i]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        mx, my = transform @ (float(cx), float(cy))
        if dedup_radius_m > 0 and any(math.hypot(mx - tx, my - ty) < dedup_radius_m
                                      for tx, ty in taken):
            duplicates += 1
            continue
        window = _centred_window(cx, cy, tile_px, scene.width, scene.height)
        if window in windows:  # clamped at a scene edge onto a chip already taken
            duplicates += 1
            continue
        if len(examples) >= max_examples:
            capped += 1
            continue
        windows.add(window)
        lonlat = reproject_geometries(np.array([shapely.Point(mx, my)], dtype=object),
                                      scene.crs, WGS84)[0]
        examples.append(HardExample(
            scene_id=scene.scene_id,
            reason="false_positive" if kind == 0 else "false_negative",
            class_name=classes[int(pred_classes[i] if kind == 0 else truth_classes[i])],
            score=round(float(pred_scores[i]), 4) if kind == 0 else None,
            model_version=model_version,
            box_px=(round(float(box[0]), 2), round(float(box[1]), 2), round(float(box[2]), 2),
                    round(float(box[3]), 2)),
            center_map=(round(float(mx), 3), round(float(my), 3)),
            center_lonlat=(round(float(lonlat.x), 7), round(float(lonlat.y), 7)),
            window=window,
            crs=scene.crs.to_string(),
        ))
        taken.append((mx, my))
    return examples, duplicates, capped, candidates


def mine_scene(scene_path: str | Path, truth_path: str | Path, pred_path: str | Path,
               cfg: ObjectTypeConfig, out_dir: str | Path, *, model_version: str,
               scene_id: str | None = None, max_examples: int | None = None,
               taken_lonlat: Sequence[tuple[float, float]] = (),
               workers: int | None = None) -> MiningResult:
    """Mine one scene and write its hard chips as a shard under ``out_dir``.

    ``taken_lonlat`` are centres (longitude, latitude) of hard chips already taken, by earlier
    cycles or other scenes; candidates near them are duplicates.

    Raises:
        InputError: the scene, truth or predictions are unusable (names the file).
    """
    # The raster layer and the tiler load rasterio and OpenCV: only when a scene is mined.
    from retrain_lib.geo.raster import inspect_scene, resolve_tile_px
    from retrain_lib.stages.tiling import tile_scene

    scene = inspect_scene(scene_path, scene_id)
    taken_centres: list[tuple[float, float]] = []
    if len(taken_lonlat):
        points = reproject_geometries(shapely.points(np.asarray(taken_lonlat, dtype=float)),
                                      WGS84, scene.crs)
        taken_centres = [(p.x, p.y) for p in points]
    tile_px, _ = resolve_tile_px(cfg.tiling, scene)
    truth = read_scene_boxes(truth_path, crs=scene.crs, transform=scene.transform)
    preds = read_scene_boxes(pred_path, crs=scene.crs, transform=scene.transform, scores=True)
    examples, duplicates, capped, candidates = select_hard_examples(
        scene=scene, classes=cfg.classes, pred_boxes=preds.boxes,
        pred_classes=cfg.class_mapper.indexes(preds.class_names, source=str(pred_path)),
        pred_scores=preds.scores if preds.scores is not None else np.zeros(0),
        truth_boxes=truth.boxes,
        truth_classes=cfg.class_mapper.indexes(truth.class_names, source=str(truth_path)),
        tile_px=tile_px, model_version=model_version,
        iou_threshold=cfg.mining.iou_threshold, conf_threshold=cfg.mining.conf_threshold,
        max_examples=cfg.mining.max_per_scene if max_examples is None else max_examples,
        dedup_radius_m=cfg.mining.dedup_radius_m, taken_centres=taken_centres)
    shards: tuple[Path, ...] = ()
    if examples:
        windows = [PixelWindow(*e.window) for e in examples]
        extras = [{"reason": e.reason, "score": e.score, "class": e.class_name,
                   "model_version": e.model_version, "center_map": list(e.center_map),
                   "center_lonlat": list(e.center_lonlat)} for e in examples]
        result = tile_scene(scene_path, truth_path, cfg.classes, out_dir, cfg.tiling,
                            scene_id=scene.scene_id, class_mapper=cfg.class_mapper,
                            windows=windows, tile_extras=extras, workers=workers)
        shards = (result.shard_dir,)
    return MiningResult(tuple(examples), shards, duplicates, capped, candidates)


@dataclass(frozen=True)
class SceneToMine:
    """One new scene with its truth and the champion's detections on it."""

    scene_path: Path
    truth_path: Path
    pred_path: Path
    scene_id: str


def mine_hard_examples(scenes: Sequence[SceneToMine], cfg: ObjectTypeConfig,
                       out_dir: str | Path, *, model_version: str, cycle_id: str,
                       previous_lonlat: Sequence[tuple[float, float]] = (),
                       workers: int | None = None) -> MiningResult:
    """Mine every scene of a cycle within the cycle cap; writes ``manifest.json``.

    ``previous_lonlat`` are the centres of earlier cycles' hard chips (deduplication).
    """
    out_dir = Path(out_dir)
    examples: list[HardExample] = []
    shards: list[Path] = []
    duplicates = capped = 0
    candidates: Counter[str] = Counter()
    taken = list(previous_lonlat)
    for item in scenes:
        room = max(0, cfg.mining.max_per_cycle - len(examples))
        result = mine_scene(item.scene_path, item.truth_path, item.pred_path, cfg, out_dir,
                            model_version=model_version, scene_id=item.scene_id,
                            max_examples=min(room, cfg.mining.max_per_scene),
                            taken_lonlat=taken, workers=workers)
        examples += result.examples
        shards += result.shard_dirs
        duplicates += result.duplicates
        capped += result.capped
        candidates.update(result.candidates)
        taken += [e.center_lonlat for e in result.examples]
    outcome = MiningResult(tuple(examples), tuple(shards), duplicates, capped, dict(candidates))
    manifest = {"cycle_id": cycle_id, "object_type": cfg.name, "model_version": model_version,
                "scenes": [s.scene_id for s in scenes], **outcome.to_dict()}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return outcome
