"""The stages of one retraining cycle as plain functions, shared by the DAGs and the CLI.

Each stage reads what earlier stages wrote under the storage root and returns a small
JSON-ready dict (ids, URIs, counts): what Airflow passes through XCom. Every stage is
idempotent for a given ``cycle_id``, so a retried task or a re-run of the same logical date
neither duplicates nor loses work.

Order: :func:`check_new_data` -> :func:`ingest` -> :func:`tile_one` (per scene) ->
:func:`mine` -> :func:`assemble` -> :func:`train_candidate` (per candidate) ->
:func:`evaluate_models` -> :func:`register_and_promote` -> :func:`write_report`.
:func:`run_cycle` runs them in order in one process.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrain_lib import __version__
from retrain_lib.config import ObjectTypeConfig
from retrain_lib.errors import RetrainError
from retrain_lib.storage import LocalStorage, Storage, default_storage_uri, join_key, open_storage

__all__ = [
    "CycleSettings",
    "assemble",
    "check_new_data",
    "evaluate_models",
    "ingest",
    "mine",
    "predictions_index_key",
    "predictions_key",
    "register_and_promote",
    "run_cycle",
    "run_cycle_id",
    "scenes_to_tile",
    "score_detector",
    "tile_one",
    "train_candidate",
    "untrained_scenes",
    "write_report",
]

log = logging.getLogger(__name__)
EVAL_CONF = 0.001  # COCO mAP needs the whole score range


@dataclass(frozen=True)
class CycleSettings:
    """Where a cycle reads and writes. Defaults are the embedded ones."""

    storage_uri: str = field(default_factory=default_storage_uri)
    mlflow_uri: str | None = None
    scratch: str | None = None
    aws_conn_id: str | None = None

    @property
    def tracking_uri(self) -> str:
        from retrain_lib.registry import default_tracking_uri

        return self.mlflow_uri or default_tracking_uri()

    def storage(self) -> Storage:
        return open_storage(self.storage_uri, aws_conn_id=self.aws_conn_id)

    def scratch_dir(self, name: str) -> Path:
        # Absolute: Ultralytics resolves a relative data.yaml path against its own folders.
        root = Path(self.scratch or os.environ.get("AUTORETRAIN_SCRATCH")
                    or tempfile.gettempdir()).expanduser().resolve() / "autoretrain"
        path = root / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        path.mkdir(parents=True, exist_ok=True)
        return path


def safe_cycle_id(raw: str) -> str:
    """A storage- and MLflow-safe cycle id from e.g. an Airflow run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_.")[:100] or "cycle"


def run_cycle_id(run_id: str, logical_date: datetime | None = None) -> str:
    """The cycle id of an Airflow DAG run.

    A run with a logical date is keyed by it, so every run of the same logical date (a re-run,
    which Airflow 3 gives a new run id, a cleared task, a retry) is the same cycle and finds
    its earlier work. A run without one (a manual trigger) is keyed by its run id.
    """
    if logical_date is None:
        return safe_cycle_id(run_id)
    when = logical_date.astimezone(UTC)
    fraction = f".{when.microsecond:06d}" if when.microsecond else ""
    return safe_cycle_id(when.strftime("%Y-%m-%dT%H-%M-%S") + fraction + "Z")


def _now() -> datetime:
    return datetime.now(UTC)


def _state_key(object_type: str) -> str:
    return join_key("cycles", object_type, "state.json")


def _state(storage: Storage, object_type: str) -> dict[str, Any]:
    key = _state_key(object_type)
    return storage.get_json(key) if storage.exists(key) else {"trained_scenes": []}


def _registry(cfg: ObjectTypeConfig, settings: CycleSettings) -> Any:
    from retrain_lib.registry import ModelRegistry

    return ModelRegistry(cfg.registered_model_name, settings.tracking_uri)


def version_uri(cfg: ObjectTypeConfig, version: str) -> str:
    """``models:/<name>/<version>``: a pinned version, not the moving alias."""
    return f"models:/{cfg.registered_model_name}/{version}"


def champion_detector(cfg: ObjectTypeConfig, settings: CycleSettings) -> tuple[str, Any] | None:
    """The current champion's version and a loaded detector, or None before the first one.

    The version is pinned, so an alias moved meanwhile cannot swap the model under a stage.
    """
    champion = _registry(cfg, settings).champion()
    if champion is None:
        return None
    return champion.version, _version_detector(cfg, settings, champion.version)


def _version_detector(cfg: ObjectTypeConfig, settings: CycleSettings, version: str) -> Any:
    from retrain_lib.inference import load_detector

    return load_detector(version_uri(cfg, version), device=cfg.training.device,
                         tracking_uri=settings.tracking_uri)


# --------------------------------------------------------------------------- 1. check


def check_new_data(cfg: ObjectTypeConfig, settings: CycleSettings, *, force: bool = False,
                   now: datetime | None = None) -> dict[str, Any]:
    """The trigger policy: is there enough new data, or has it been too long?

    New annotations are those in drops waiting in ``incoming/`` plus cataloged scenes no
    training has used yet (for example after a failed cycle).
    """
    from retrain_lib.ingest import count_pending_annotations, list_catalog_scenes

    storage = settings.storage()
    state = _state(storage, cfg.name)
    pending = count_pending_annotations(storage, cfg.name)
    trained = set(state.get("trained_scenes", []))
    untrained = [m for m in list_catalog_scenes(storage, cfg.name) if m["scene_id"] not in trained]
    new = sum(pending.values()) + sum(m["objects"] for m in untrained)
    last = state.get("last_trained_at")
    days = None
    if last:
        days = ((now or _now()) - datetime.fromisoformat(last)).total_seconds() / 86400
    policy = cfg.trigger
    has_data = bool(pending) or bool(untrained) or bool(trained)
    if force:
        retrain, reason = True, "forced by the run's params"
    elif new > 0 and new >= policy.min_new_annotations:
        retrain, reason = True, (f"{new} new annotations >= {policy.min_new_annotations}")
    elif (days is not None and policy.max_days_without_training is not None
          and days >= policy.max_days_without_training and has_data):
        retrain, reason = True, (f"{days:.1f} days since the last training >= "
                                 f"{policy.max_days_without_training}")
    else:
        since = f"{days:.1f} days since the last training" if days is not None else \
            "never trained"
        retrain, reason = False, (f"only {new} new annotations (< {policy.min_new_annotations})"
                                  f" and {since}")
    return {"retrain": retrain, "reason": reason, "new_annotations": new,
            "pending_drops": sorted(pending), "untrained_scenes": len(untrained),
            "days_since_training": None if days is None else round(days, 2)}


# --------------------------------------------------------------------------- 2. ingest


def ingest(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str) -> dict[str, Any]:
    """Catalog good drops, quarantine bad ones (see :mod:`retrain_lib.ingest`)."""
    from retrain_lib.ingest import ingest_drops

    storage = settings.storage()
    report = ingest_drops(storage, cfg, scratch=settings.scratch_dir(f"ingest-{cycle_id}"),
                          cycle_id=cycle_id,
                          on_drop=lambda o: log.info("drop %s: %s %s", o.drop_id, o.status,
                                                     [p.problem for p in o.problems]))
    return report.to_dict()


# --------------------------------------------------------------------------- 3. tile


def _shard_prefix(cfg: ObjectTypeConfig, scene_id: str) -> str:
    from retrain_lib.tiling import params_hash

    return join_key("chips", cfg.name, params_hash(cfg.tiling, cfg.classes), scene_id)


def scenes_to_tile(cfg: ObjectTypeConfig, settings: CycleSettings) -> list[str]:
    """Every cataloged scene (tiling a scene whose shard exists is a cheap no-op)."""
    from retrain_lib.ingest import list_catalog_scenes

    return [m["scene_id"] for m in list_catalog_scenes(settings.storage(), cfg.name)]


def untrained_scenes(cfg: ObjectTypeConfig, settings: CycleSettings) -> list[str]:
    """Cataloged scenes no finished cycle has trained on yet: what this cycle mines."""
    storage = settings.storage()
    trained = set(_state(storage, cfg.name).get("trained_scenes", []))
    return [s for s in scenes_to_tile(cfg, settings) if s not in trained]


def tile_one(cfg: ObjectTypeConfig, settings: CycleSettings, scene_id: str) -> dict[str, Any]:
    """Tile one cataloged scene into ``chips/<type>/<params_hash>/<scene_id>``."""
    from retrain_lib.ingest import catalog_prefix
    from retrain_lib.tiling import tile_scene

    storage = settings.storage()
    prefix = _shard_prefix(cfg, scene_id)
    index_key = join_key(prefix, "index.json")
    if storage.exists(index_key):
        index = storage.get_json(index_key)
        return {"scene_id": scene_id, "shard": prefix, "reused": True,
                "tiles_written": index["stats"]["tiles_written"]}
    scene_prefix = join_key(catalog_prefix(cfg.name), scene_id)
    scratch = settings.scratch_dir(f"tile-{cfg.name}-{scene_id}")
    with storage.local_copy(join_key(scene_prefix, "scene.tif"), scratch) as scene_path, \
            storage.local_copy(join_key(scene_prefix, "annotations.geojson"), scratch) as labels:
        if isinstance(storage, LocalStorage):
            out_dir = storage.path(join_key("chips", cfg.name))
            result = tile_scene(scene_path, labels, cfg.classes, out_dir, cfg.tiling,
                                scene_id=scene_id, class_normaliser=cfg.normalise_class)
        else:
            result = tile_scene(scene_path, labels, cfg.classes, scratch / "chips", cfg.tiling,
                                scene_id=scene_id, class_normaliser=cfg.normalise_class)
            storage.put_tree(result.shard_dir, prefix, last="index.json")
    return {"scene_id": scene_id, "shard": prefix, "reused": False,
            "tiles_written": result.tiles_written}


# --------------------------------------------------------------------------- 4. mine


def _scene_files(storage: Storage, cfg: ObjectTypeConfig, scene_id: str, scratch: Path
                 ) -> tuple[Path, Path]:
    from retrain_lib.ingest import catalog_prefix

    prefix = join_key(catalog_prefix(cfg.name), scene_id)
    if isinstance(storage, LocalStorage):
        return (storage.path(join_key(prefix, "scene.tif")),
                storage.path(join_key(prefix, "annotations.geojson")))
    scene = storage.get_file(join_key(prefix, "scene.tif"), scratch / scene_id / "scene.tif")
    labels = storage.get_file(join_key(prefix, "annotations.geojson"),
                              scratch / scene_id / "annotations.geojson")
    return scene, labels


def predictions_key(object_type: str, model_version: str, scene_id: str) -> str:
    """Where the detect DAG stores a model version's detections of a scene."""
    return join_key("predictions", object_type, str(model_version), f"{scene_id}.geojson")


def predictions_index_key(object_type: str, model_version: str, scene_sha256: str) -> str:
    """Index entry naming the stored predictions of a scene file, by the file's SHA-256.

    The detect DAG writes it; mining uses it to find predictions of a scene that analysts
    annotated and dropped under another name.
    """
    return join_key("predictions", object_type, str(model_version), "by-sha256",
                    f"{scene_sha256}.json")


def _detect_to_storage(storage: Storage, cfg: ObjectTypeConfig, detector: Any,
                       scene_path: Path, scene_id: str, key: str, scratch: Path) -> Path:
    from retrain_lib.inference import DetectOptions, detect_scene, write_detections

    detections = detect_scene(scene_path, detector,
                              DetectOptions(tiling=cfg.tiling, conf=cfg.mining.conf_threshold),
                              scene_id=scene_id)
    local = scratch / f"{scene_id}.geojson"
    write_detections(detections, local)
    storage.put_file(local, key)
    return local


def _previous_hard(storage: Storage, object_type: str, cycle_id: str
                   ) -> tuple[list[str], list[tuple[float, float]]]:
    shards: list[str] = []
    centres: list[tuple[float, float]] = []
    base = join_key("hard", object_type)
    for other in storage.list_children(base):
        key = join_key(base, other, "manifest.json")
        if other == cycle_id or not storage.exists(key):
            continue
        manifest = storage.get_json(key)
        shards += [join_key(base, other, s) for s in manifest.get("scenes_with_chips", [])]
        centres += [tuple(e["center_lonlat"]) for e in manifest.get("examples", [])]
    return shards, centres


def mine(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
         new_scene_ids: Sequence[str]) -> dict[str, Any]:
    """Mine the champion's mistakes on the new (non-test) scenes into ``hard/<type>/<cycle>``."""
    from retrain_lib.dataset import assign_scene_splits
    from retrain_lib.ingest import list_catalog_scenes
    from retrain_lib.mining import SceneToMine, mine_hard_examples

    storage = settings.storage()
    base = join_key("hard", cfg.name, cycle_id)
    manifest_key = join_key(base, "manifest.json")
    if storage.exists(manifest_key):
        manifest = storage.get_json(manifest_key)
        return {**manifest, "reused": True}
    if not cfg.mining.enabled:
        return {"skipped": "mining is disabled in the config", "counts": {}}
    champion = _registry(cfg, settings).champion()
    if champion is None:
        return {"skipped": "no champion yet: nothing to learn from", "counts": {}}
    manifests = {m["scene_id"]: m for m in list_catalog_scenes(storage, cfg.name)}
    splits = assign_scene_splits(storage, cfg, {s: m.get("region", "")
                                                for s, m in manifests.items()},
                                 cycle_id=cycle_id)
    # Only training scenes: a validation scene's hard chips would train on what picks best.pt.
    targets = [s for s in new_scene_ids if s in splits and splits[s].split == "train"]
    if not targets:
        return {"skipped": "no new training scene", "counts": {}}
    scratch = settings.scratch_dir(f"mine-{cfg.name}-{cycle_id}")
    detector = None
    items = []
    for scene_id in targets:
        scene_path, truth = _scene_files(storage, cfg, scene_id, scratch)
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
                detector = _version_detector(cfg, settings, champion.version)
            log.info("no stored predictions of v%s for %s: detecting now", champion.version,
                     scene_id)
            pred = _detect_to_storage(storage, cfg, detector, scene_path, scene_id, key,
                                      scratch / "pred")
        items.append(SceneToMine(scene_path, truth, pred, scene_id))
    _, previous = _previous_hard(storage, cfg.name, cycle_id)
    out = scratch / "hard"
    result = mine_hard_examples(items, cfg, out, model_version=champion.version,
                                cycle_id=cycle_id, previous_lonlat=previous)
    with_chips = sorted({p.name for p in result.shard_dirs})
    for shard in result.shard_dirs:
        storage.put_tree(shard, join_key(base, shard.name), last="index.json")
    summary = {"cycle_id": cycle_id, "model_version": champion.version,
               "scenes": targets, "scenes_with_chips": with_chips, **result.to_dict()}
    summary.pop("shard_dirs", None)
    storage.put_json(manifest_key, summary)
    return summary


# --------------------------------------------------------------------------- 5. assemble


def assemble(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str) -> dict[str, Any]:
    """Assemble the dataset version from every cataloged scene and every hard shard so far."""
    from retrain_lib.dataset import assemble_dataset
    from retrain_lib.ingest import list_catalog_scenes

    storage = settings.storage()
    manifests = list_catalog_scenes(storage, cfg.name)
    if not manifests:
        raise RetrainError(f"{cfg.name}: the catalog is empty; nothing to train on")
    scene_shards = {m["scene_id"]: _shard_prefix(cfg, m["scene_id"]) for m in manifests}
    missing = [s for s, p in scene_shards.items()
               if not storage.exists(join_key(p, "index.json"))]
    if missing:
        raise RetrainError(f"{cfg.name}: scenes not tiled yet: {', '.join(missing)}; run the "
                           "tile stage first")
    regions = {m["scene_id"]: m.get("region", "") for m in manifests}
    hard = [join_key("hard", cfg.name, c, s)
            for c in storage.list_children(join_key("hard", cfg.name))
            if storage.exists(join_key("hard", cfg.name, c, "manifest.json"))
            for s in storage.get_json(join_key("hard", cfg.name, c, "manifest.json")
                                      ).get("scenes_with_chips", [])]
    state = _state(storage, cfg.name)
    version = assemble_dataset(storage, cfg, scene_shards=scene_shards, regions=regions,
                               hard_shards=hard, cycle_id=cycle_id,
                               parent_version=state.get("last_dataset_version", ""))
    return {**version.to_dict(), "url": storage.url(version.prefix),
            "scene_ids": sorted(scene_shards), "hard_shards": len(hard)}


# --------------------------------------------------------------------------- 6. train


def train_candidate(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                    dataset: Mapping[str, Any], candidate: str, *,
                    epochs: int | None = None, context: Mapping[str, Any] | None = None,
                    ) -> dict[str, Any]:
    """Fine-tune one candidate through the configured runner; a re-run reuses its result."""
    from retrain_lib.runners import run_training
    from retrain_lib.train import TrainRequest, TrainResult

    by_name = {c.name: c for c in cfg.training.candidates}
    if candidate not in by_name:
        raise RetrainError(f"{cfg.name}: unknown candidate {candidate!r}; configured: "
                           f"{', '.join(by_name)}")
    storage = settings.storage()
    run_prefix = join_key("models", cfg.name, f"{cycle_id}-{candidate}")
    result_key = join_key(run_prefix, "result.json")
    if storage.exists(result_key):
        return {**storage.get_json(result_key), "candidate": candidate, "reused": True}
    champion = _registry(cfg, settings).champion()
    if cfg.training.warm_start and champion is not None:
        weights = version_uri(cfg, champion.version)
        parent = champion.version
    else:
        weights, parent = cfg.training.initial_model, None
    overrides = dict(by_name[candidate].overrides)
    request = TrainRequest(
        data=str(dataset["url"]), weights=weights, out=storage.url(run_prefix),
        epochs=epochs or int(overrides.pop("epochs", cfg.training.epochs)),
        imgsz=int(overrides.pop("imgsz", cfg.training.imgsz)),
        batch=int(overrides.pop("batch", cfg.training.batch)),
        device=cfg.training.device, workers=cfg.training.workers, seed=cfg.training.seed,
        plots=False, params=overrides, classes=list(cfg.classes),
        mlflow_uri=settings.tracking_uri, experiment=f"autoretrain-{cfg.name}",
        object_type=cfg.name, dataset_version=str(dataset["version"]),
        parent_model_version=parent, cycle_id=cycle_id, candidate=candidate,
        scratch=str(settings.scratch_dir("train")))
    result: TrainResult = run_training(request, cfg.runner, context=context)
    import json

    payload = {**json.loads(result.to_json()), "candidate": candidate,
               "parent_version": parent, "weights": weights}
    storage.put_json(result_key, payload)
    return payload


# --------------------------------------------------------------------------- 7. evaluate


def score_detector(detector: Any, cfg: ObjectTypeConfig,
                   tests: Sequence[tuple[str, Path, Path, str]]) -> dict[str, Any]:
    """COCO metrics of ``detector`` over whole scenes, overall and per region.

    ``tests`` holds ``(scene_id, scene_path, truth_path, region)``; the scenes are scored as
    one COCO dataset (and per region), in the object type's class order.
    """
    import numpy as np

    from retrain_lib.evaluate import SceneEvalInput, evaluate_scenes, read_scene_boxes
    from retrain_lib.inference import DetectOptions, detect_scene

    options = DetectOptions(tiling=cfg.tiling, conf=EVAL_CONF)
    inputs = []
    for scene_id, scene_path, truth_path, region in tests:
        detections = detect_scene(scene_path, detector, options, scene_id=scene_id)
        # Score every model in the object type's class order, whatever its own order (a
        # champion from before a class was added knows fewer classes).
        to_cfg = np.array([cfg.classes.index(n) if n in cfg.classes else -1
                           for n in detections.class_names], dtype=np.int64)
        pred_classes = to_cfg[detections.classes] if len(detections.classes) else \
            np.zeros(0, np.int64)
        known = pred_classes >= 0
        truth = read_scene_boxes(truth_path, crs=detections.scene.crs,
                                 transform=detections.scene.transform)
        truth_classes = [cfg.normalise_class(n) for n in truth.class_names]
        inputs.append((region, SceneEvalInput(
            scene_id, detections.boxes[known], pred_classes[known], detections.scores[known],
            truth.boxes, np.array([cfg.class_index(n) for n in truth_classes if n],
                                  dtype=np.int64))))
    overall = evaluate_scenes([i for _, i in inputs], cfg.classes,
                              iou_threshold=cfg.mining.iou_threshold,
                              conf_threshold=cfg.mining.conf_threshold).to_dict()
    regions = {}
    for region in sorted({r for r, _ in inputs}):
        subset = [i for r, i in inputs if r == region]
        m = evaluate_scenes(subset, cfg.classes, iou_threshold=cfg.mining.iou_threshold,
                            conf_threshold=cfg.mining.conf_threshold).to_dict()
        regions[region or "(none)"] = {k: m[k] for k in ("map50_95", "map50", "precision",
                                                           "recall")}
    return {**overall, "regions": regions}


def evaluate_models(cfg: ObjectTypeConfig, settings: CycleSettings,
                    dataset: Mapping[str, Any], trained: Sequence[Mapping[str, Any]]
                    ) -> dict[str, Any]:
    """Score every candidate and the champion on the same frozen test scenes, now."""
    from retrain_lib.inference import load_detector

    storage = settings.storage()
    test_scenes = list(dataset["test_scenes"])
    if not test_scenes:
        raise RetrainError(f"{cfg.name}: the frozen test set is empty; a region needs at least "
                           "two scenes before one is held out")
    regions = storage.get_json(join_key(dataset["prefix"], "test_scenes.json"))["regions"]
    scratch = settings.scratch_dir(f"eval-{cfg.name}-{dataset['version']}")
    tests = []
    for scene_id in test_scenes:
        scene_path, truth = _scene_files(storage, cfg, scene_id, scratch)
        tests.append((scene_id, scene_path, truth, regions.get(scene_id, "")))
    results: dict[str, Any] = {"test_scenes": test_scenes, "candidates": {}}
    for item in trained:
        detector = load_detector(item["weights_uri"], device=cfg.training.device,
                                 tracking_uri=settings.tracking_uri)
        results["candidates"][item["candidate"]] = score_detector(detector, cfg, tests)
    champion = champion_detector(cfg, settings)
    if champion is not None:
        version, detector = champion
        results["champion"] = {"version": version,
                               "metrics": score_detector(detector, cfg, tests)}
    return results


# --------------------------------------------------------------------------- 8. promote


def register_and_promote(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                         dataset: Mapping[str, Any], trained: Sequence[Mapping[str, Any]],
                         evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """Register every candidate; move the champion alias only through the gate."""
    from retrain_lib.registry import Candidate

    registry = _registry(cfg, settings)
    candidates = []
    versions = {}
    for item in trained:
        metrics = evaluation["candidates"][item["candidate"]]
        version = registry.register_candidate(
            item["mlflow_run_id"], metrics=metrics, dataset_version=str(dataset["version"]),
            parent_version=item.get("parent_version"), cycle_id=cycle_id,
            code_version=__version__, candidate=item["candidate"])
        versions[item["candidate"]] = version
        candidates.append(Candidate(version, metrics))
    champion = evaluation.get("champion")
    current = registry.champion()
    if current is not None and (champion is None or champion["version"] != current.version):
        raise RetrainError(f"{cfg.name}: the champion changed to v{current.version} during the "
                           "cycle; re-run the evaluate stage")
    if current is not None and all(
            registry.get_version(c.version).tags.get("decision") for c in candidates):
        # A re-run of a finished cycle: every candidate was already decided.
        return {"versions": versions, "promoted_version": None, "reused": True,
                "champion_version": current.version, "decisions": {
                    c.version: registry.get_version(c.version).tags.get("decision_reason", "")
                    for c in candidates}}
    outcome = registry.promote_if_better(candidates, champion["metrics"] if champion else None,
                                         cfg.promotion)
    new = registry.champion()
    return {
        "versions": versions,
        "promoted_version": outcome.promoted_version,
        "previous_champion": outcome.previous_champion,
        "champion_version": new.version if new else None,
        "champion_uri": registry.model_uri() if new else None,
        "decisions": {v: {"promote": d.promote, "reason": d.reason}
                      for v, d in outcome.decisions.items()},
    }


# --------------------------------------------------------------------------- 9. report


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# Cycle {report['cycle_id']} ({report['object_type']})", "",
             f"- started: {report.get('started_at', '')}", f"- status: {report['status']}",
             f"- trigger: {report['check'].get('reason', '')}"]
    ingest_ = report.get("ingest") or {}
    if ingest_:
        lines.append(f"- ingest: {ingest_['cataloged']} drop(s) cataloged, "
                     f"{ingest_['quarantined']} quarantined, {ingest_['new_annotations']} new "
                     "annotations")
    if report.get("tiles"):
        lines.append(f"- chips: {sum(t['tiles_written'] for t in report['tiles'])} over "
                     f"{len(report['tiles'])} scene(s)")
    mine_ = report.get("mine") or {}
    if mine_:
        lines.append(f"- hard examples: {mine_.get('counts') or mine_.get('skipped')}")
    dataset = report.get("dataset") or {}
    if dataset:
        lines.append(f"- dataset: {dataset['version']} ({dataset['train_images']} train / "
                     f"{dataset['val_images']} val images, {len(dataset['test_scenes'])} "
                     "test scenes)")
    evaluation = report.get("evaluation") or {}
    if evaluation:
        lines += ["", "| model | map50_95 | map50 | precision | recall |", "|---|---|---|---|---|"]
        rows = [(f"candidate {k}", v) for k, v in evaluation.get("candidates", {}).items()]
        if evaluation.get("champion"):
            rows.append((f"champion v{evaluation['champion']['version']}",
                         evaluation["champion"]["metrics"]))
        for name, m in rows:
            lines.append(f"| {name} | " + " | ".join(
                "-" if m.get(k) is None else f"{m[k]:.4f}"
                for k in ("map50_95", "map50", "precision", "recall")) + " |")
    promotion = report.get("promotion") or {}
    if promotion:
        promoted = promotion.get("promoted_version")
        champion = promotion.get("champion_version")
        lines += ["", f"Promotion: {'v' + str(promoted) if promoted else 'none'}; champion is "
                  f"{'v' + str(champion) if champion else 'none'}."]
        for version, decision in (promotion.get("decisions") or {}).items():
            reason = decision["reason"] if isinstance(decision, dict) else decision
            lines.append(f"- v{version}: {reason}")
    return "\n".join(lines) + "\n"


def write_report(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                 stages: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``cycles/<type>/<cycle_id>/report.json`` and ``report.md``; update the state."""
    storage = settings.storage()
    check = stages.get("check") or {}
    trained = bool(stages.get("promotion"))
    status = "skipped" if not check.get("retrain", True) else (
        "promoted" if (stages.get("promotion") or {}).get("promoted_version") else
        "completed" if trained else "incomplete")
    report = {"cycle_id": cycle_id, "object_type": cfg.name, "status": status,
              "written_at": _now().isoformat(timespec="seconds"), "code_version": __version__,
              **dict(stages)}
    base = join_key("cycles", cfg.name, cycle_id)
    storage.put_json(join_key(base, "report.json"), report)
    storage.put_bytes(join_key(base, "report.md"), _markdown(report).encode())
    if trained:
        state = _state(storage, cfg.name)
        dataset = stages.get("dataset") or {}
        state.update({
            "last_trained_at": _now().isoformat(timespec="seconds"),
            "last_cycle_id": cycle_id,
            "last_dataset_version": dataset.get("version", ""),
            "trained_scenes": sorted(set(state.get("trained_scenes", []))
                                     | set(dataset.get("scene_ids", []))),
        })
        storage.put_json(_state_key(cfg.name), state)
    return {"status": status, "report": storage.url(join_key(base, "report.json")),
            "promoted_version": (stages.get("promotion") or {}).get("promoted_version")}


# --------------------------------------------------------------------------- all in one


def run_cycle(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str, *,
              force: bool = False, epochs: int | None = None,
              candidates: Sequence[str] | None = None,
              on_stage: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run every stage in this process, in order (no Airflow); returns the report."""
    def done(name: str, value: Any) -> Any:
        stages[name] = value
        if on_stage is not None:
            on_stage(name, value)
        return value

    stages: dict[str, Any] = {"started_at": _now().isoformat(timespec="seconds")}
    check = done("check", check_new_data(cfg, settings, force=force))
    if not check["retrain"]:
        return {**write_report(cfg, settings, cycle_id, stages), **stages}
    done("ingest", ingest(cfg, settings, cycle_id))
    done("tiles", [tile_one(cfg, settings, s) for s in scenes_to_tile(cfg, settings)])
    new_scenes = untrained_scenes(cfg, settings)
    done("mine", mine(cfg, settings, cycle_id, new_scenes))
    dataset = done("dataset", assemble(cfg, settings, cycle_id))
    names = list(candidates) if candidates else [c.name for c in cfg.training.candidates]
    trained = done("trained", [train_candidate(cfg, settings, cycle_id, dataset, n,
                                               epochs=epochs) for n in names])
    evaluation = done("evaluation", evaluate_models(cfg, settings, dataset, trained))
    done("promotion", register_and_promote(cfg, settings, cycle_id, dataset, trained,
                                           evaluation))
    return {**write_report(cfg, settings, cycle_id, stages), **stages}
