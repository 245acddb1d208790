"""4. mine: the champion's mistakes on this cycle's new training scenes become hard chips."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.layout import (
    hard_cycle_prefix,
    hard_manifest_key,
    hard_prefix,
    join_key,
    predictions_index_key,
    predictions_key,
)
from retrain_lib.core.storage import Storage
from retrain_lib.cycle.champion import registry, version_detector
from retrain_lib.cycle.data import catalog_files, untrained_scenes
from retrain_lib.cycle.results import MiningSummary
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.geo.raster import object_storage
from retrain_lib.stages.dataset import assign_scene_splits
from retrain_lib.stages.inference import DetectOptions, Detector, detect_scene, write_detections
from retrain_lib.stages.ingest import list_catalog_scenes
from retrain_lib.stages.mining import SceneToMine, mine_hard_examples

__all__ = ["detect_to_storage", "mine"]

log = logging.getLogger(__name__)


def detect_to_storage(storage: Storage, cfg: ObjectTypeConfig, detector: Detector,
                      scene_path: Path, scene_id: str, key: str, scratch: Path) -> Path:
    """Detect on a scene at the mining threshold, store the GeoJSON at ``key``; returns the
    local copy."""
    detections = detect_scene(scene_path, detector,
                              DetectOptions(tiling=cfg.tiling, conf=cfg.mining.conf_threshold),
                              scene_id=scene_id)
    local = scratch / f"{scene_id}.geojson"
    write_detections(detections, local)
    storage.put_file(local, key)
    return local


def _earlier_centres(storage: Storage, object_type: str, cycle_id: str
                     ) -> list[tuple[float, float]]:
    """Centres (lon, lat) of the hard chips of every other cycle: deduplication."""
    centres: list[tuple[float, float]] = []
    for other in storage.list_children(hard_prefix(object_type)):
        key = hard_manifest_key(object_type, other)
        if other != cycle_id and storage.exists(key):
            manifest = MiningSummary.from_json(storage.get_json(key))
            centres += [e.center_lonlat for e in manifest.examples or []]
    return centres


def mine(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
         new_scene_ids: Sequence[str] | None = None) -> MiningSummary:
    """Mine the champion's mistakes on the new (training) scenes into ``hard/<type>/<cycle>``.

    The new scenes are ``new_scene_ids``, by default the cataloged scenes no finished cycle
    has trained on yet.

    Uses the champion's stored predictions of a scene when the detect DAG made them (also
    for a scene dropped for inference under another name, found by its SHA-256), else
    detects now and stores them.

    Raises:
        RegistryUnavailable: MLflow did not answer: mining is not skipped silently.
    """
    storage = settings.storage()
    manifest_key = hard_manifest_key(cfg.name, cycle_id)
    if storage.exists(manifest_key):
        return MiningSummary.from_json({**storage.get_json(manifest_key), "reused": True})
    if not cfg.mining.enabled:
        return MiningSummary(skipped="mining is disabled in the config", counts={})
    # The champion the cycle started with: a rerun that finds its own promotion done must not
    # mine its own model's mistakes.
    champion = registry(cfg, settings).champion_for_cycle(cycle_id)
    if champion is None:
        return MiningSummary(skipped="no champion yet: nothing to learn from", counts={})
    if new_scene_ids is None:
        new_scene_ids = untrained_scenes(cfg, settings)
    manifests = {m["scene_id"]: m for m in list_catalog_scenes(storage, cfg.name)}
    splits = assign_scene_splits(storage, cfg, {s: m.get("region", "")
                                                for s, m in manifests.items()},
                                 cycle_id=cycle_id)
    # Only training scenes: a validation scene's hard chips would train on what picks best.pt.
    targets = [s for s in new_scene_ids if s in splits and splits[s].split == "train"]
    if not targets:
        return MiningSummary(skipped="no new training scene", counts={})
    scratch = settings.scratch_dir(f"mine-{cfg.name}-{cycle_id}")
    with object_storage(settings.s3):  # new scenes are read in place, window by window
        detector = None
        items = []
        for scene_id in targets:
            scene_path, truth = catalog_files(storage, cfg, scene_id, scratch, read_in_place=True)
            key = predictions_key(cfg.name, champion.version, scene_id)
            alias = predictions_index_key(cfg.name, champion.version,
                                          manifests[scene_id].get("scene_sha256", "unknown"))
            if not storage.exists(key) and storage.exists(alias):
                key = storage.get_json(alias)["predictions"]  # detected before it was annotated
            if storage.exists(key):
                pred = storage.get_file(key, scratch / "pred" / f"{scene_id}.geojson")
                log.info("mining %s with stored predictions of v%s", scene_id, champion.version)
            else:
                if detector is None:
                    detector = version_detector(cfg, settings, champion.version)
                log.info("no stored predictions of v%s for %s: detecting now", champion.version,
                         scene_id)
                pred = detect_to_storage(storage, cfg, detector, scene_path, scene_id, key,
                                         scratch / "pred")
            items.append(SceneToMine(scene_path, truth, pred, scene_id))
        result = mine_hard_examples(items, cfg, scratch / "hard", model_version=champion.version,
                                    cycle_id=cycle_id,
                                    previous_lonlat=_earlier_centres(storage, cfg.name, cycle_id))
    base = hard_cycle_prefix(cfg.name, cycle_id)
    for shard in result.shard_dirs:
        storage.put_tree(shard, join_key(base, shard.name), last="index.json")
    details = result.to_dict()
    details.pop("shard_dirs", None)
    summary = MiningSummary.model_validate({
        "cycle_id": cycle_id, "model_version": champion.version, "scenes": targets,
        "scenes_with_chips": sorted({p.name for p in result.shard_dirs}), **details})
    storage.put_json(manifest_key, summary.to_json())
    return summary
