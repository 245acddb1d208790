"""6. train, 7. evaluate and 8. register and promote: from a dataset version to a champion."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrain_lib import __version__
from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import RetrainError
from retrain_lib.core.layout import join_key, model_run_prefix
from retrain_lib.cycle.champion import champion_detector, registry, version_uri
from retrain_lib.cycle.data import catalog_files
from retrain_lib.cycle.results import (
    AssembledDataset,
    ChampionScores,
    Evaluation,
    GateRecord,
    ModelScores,
    PromotionResult,
    RegionScores,
    TrainedCandidate,
)
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.geo.annotations import read_scene_boxes
from retrain_lib.stages.evaluate import SceneEvalInput, evaluate_scenes
from retrain_lib.stages.inference import DetectOptions, Detector, detect_scene, load_detector
from retrain_lib.stages.registry import Candidate
from retrain_lib.training.contract import TrainRequest
from retrain_lib.training.runners import run_training
from retrain_lib.training.runners.kubernetes import PodLauncher

__all__ = [
    "EVAL_CONF",
    "TestScene",
    "evaluate_models",
    "register_and_promote",
    "score_detector",
    "train_candidate",
]

log = logging.getLogger(__name__)
EVAL_CONF = 0.001  # COCO mAP needs the whole score range

TestScene = tuple[str, Path, Path, str]
"""``(scene_id, scene_path, truth_path, region)`` of one frozen test scene."""


def train_candidate(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                    dataset: AssembledDataset, candidate: str, *,
                    epochs: int | None = None,
                    launch_pod: PodLauncher | None = None) -> TrainedCandidate:
    """Fine-tune one candidate through the configured runner; a re-run reuses its result.
    ``launch_pod`` starts the kubernetes runner's pod (the Airflow task passes it).

    Warm-starts from the champion's pinned version when there is one (and
    ``training.warm_start``), else from ``training.initial_model``.

    Raises:
        RegistryUnavailable: MLflow did not answer: never a silent cold start.
    """
    by_name = {c.name: c for c in cfg.training.candidates}
    if candidate not in by_name:
        raise RetrainError(f"{cfg.name}: unknown candidate {candidate!r}; configured: "
                           f"{', '.join(by_name)}")
    storage = settings.storage()
    run_prefix = model_run_prefix(cfg.name, f"{cycle_id}-{candidate}")
    result_key = join_key(run_prefix, "result.json")
    if storage.exists(result_key):
        return TrainedCandidate.from_json({**storage.get_json(result_key),
                                           "candidate": candidate, "reused": True})
    champion = registry(cfg, settings).champion_for_cycle(cycle_id) \
        if cfg.training.warm_start else None
    if champion is not None:
        weights, parent = version_uri(cfg, champion.version), champion.version
    else:
        weights, parent = cfg.training.initial_model, None
    # A candidate's own epochs, imgsz and batch override the training defaults; the run's
    # epochs (a DAG param) override both.
    overrides = dict(by_name[candidate].overrides)
    request = TrainRequest(
        data=dataset.url, weights=weights, out=storage.url(run_prefix),
        params={k: v for k, v in overrides.items() if k not in ("epochs", "imgsz", "batch")},
        epochs=epochs or overrides.get("epochs", cfg.training.epochs),
        imgsz=overrides.get("imgsz", cfg.training.imgsz),
        batch=overrides.get("batch", cfg.training.batch),
        device=cfg.training.device, workers=cfg.training.workers, seed=cfg.training.seed,
        plots=False, classes=list(cfg.classes),
        mlflow_uri=settings.tracking_uri, experiment=f"autoretrain-{cfg.name}",
        object_type=cfg.name, dataset_version=dataset.version,
        parent_model_version=parent, cycle_id=cycle_id, candidate=candidate,
        scratch=str(settings.scratch_dir("train")))
    result = run_training(request, cfg.runner, environment=settings.training_environment(),
                          launch_pod=launch_pod)
    trained = TrainedCandidate.model_validate({
        **result.to_json(), "candidate": candidate, "parent_version": parent,
        "weights": weights})
    storage.put_json(result_key, trained.to_json())
    return trained


def score_detector(detector: Detector, cfg: ObjectTypeConfig, tests: Sequence[TestScene]
                   ) -> ModelScores:
    """COCO metrics of ``detector`` over whole scenes, overall and per region.

    The scenes are scored as one COCO dataset (and per region), in the object type's class
    order, whatever the model's own order (a champion from before a class was added knows
    fewer classes; its other classes are left out).
    """
    options = DetectOptions(tiling=cfg.tiling, conf=EVAL_CONF)
    mapper = cfg.class_mapper
    inputs = []
    for scene_id, scene_path, truth_path, region in tests:
        detections = detect_scene(scene_path, detector, options, scene_id=scene_id)
        to_cfg = mapper.indexes_or_unknown(detections.class_names)
        pred_classes = to_cfg[detections.classes] if len(detections.classes) else \
            np.zeros(0, np.int64)
        known = pred_classes >= 0
        truth = read_scene_boxes(truth_path, crs=detections.scene.crs,
                                 transform=detections.scene.transform)
        truth_classes = mapper.indexes_or_unknown(truth.class_names)
        inputs.append((region, SceneEvalInput(
            scene_id, detections.boxes[known], pred_classes[known], detections.scores[known],
            truth.boxes[truth_classes >= 0], truth_classes[truth_classes >= 0])))
    overall = evaluate_scenes([i for _, i in inputs], cfg.classes,
                              iou_threshold=cfg.mining.iou_threshold,
                              conf_threshold=cfg.mining.conf_threshold).to_dict()
    regions = {}
    for region in sorted({r for r, _ in inputs}):
        subset = [i for r, i in inputs if r == region]
        m = evaluate_scenes(subset, cfg.classes, iou_threshold=cfg.mining.iou_threshold,
                            conf_threshold=cfg.mining.conf_threshold).to_dict()
        regions[region or "(none)"] = RegionScores.model_validate(
            {k: m[k] for k in ("map50_95", "map50", "precision", "recall")})
    return ModelScores.model_validate({**overall, "regions": regions})


def evaluate_models(cfg: ObjectTypeConfig, settings: CycleSettings, dataset: AssembledDataset,
                    trained: Sequence[TrainedCandidate], *, cycle_id: str) -> Evaluation:
    """Score every candidate and the champion on the same frozen test scenes, now.

    The champion is the one the cycle started with, even on a rerun that finds its own
    promotion already done.

    Raises:
        RetrainError: the frozen test set is empty.
        RegistryUnavailable: MLflow did not answer.
    """
    storage = settings.storage()
    if not dataset.test_scenes:
        raise RetrainError(f"{cfg.name}: the frozen test set is empty; a region needs at least "
                           "two scenes before one is held out")
    regions = storage.get_json(join_key(dataset.prefix, "test_scenes.json"))["regions"]
    scratch = settings.scratch_dir(f"eval-{cfg.name}-{dataset.version}")
    tests = []
    for scene_id in dataset.test_scenes:
        # Downloaded: every candidate and the champion read each test scene whole.
        scene_path, truth = catalog_files(storage, cfg, scene_id, scratch, read_in_place=False)
        tests.append((scene_id, scene_path, truth, regions.get(scene_id, "")))
    candidates = {}
    for item in trained:
        detector = load_detector(item.weights_uri, device=cfg.training.device,
                                 tracking_uri=settings.tracking_uri)
        candidates[item.candidate] = score_detector(detector, cfg, tests)
    champion = champion_detector(cfg, settings, cycle_id)
    if champion is None:
        return Evaluation(test_scenes=list(dataset.test_scenes), candidates=candidates)
    version, detector = champion
    return Evaluation(test_scenes=list(dataset.test_scenes), candidates=candidates,
                      champion=ChampionScores(version=version,
                                              metrics=score_detector(detector, cfg, tests)))


def register_and_promote(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str,
                         dataset: AssembledDataset, trained: Sequence[TrainedCandidate],
                         evaluation: Evaluation) -> PromotionResult:
    """Register every candidate; move the champion alias only through the gate.

    Raises:
        RetrainError: the champion changed since the evaluate stage scored it.
    """
    models = registry(cfg, settings)
    candidates = []
    versions = {}
    for item in trained:
        scores = evaluation.candidates[item.candidate].headline()
        version = models.register_candidate(
            item.mlflow_run_id, metrics=scores, dataset_version=dataset.version,
            parent_version=item.parent_version, cycle_id=cycle_id, code_version=__version__,
            candidate=item.candidate)
        versions[item.candidate] = version
        candidates.append(Candidate(version, scores))
    scored = evaluation.champion
    baseline = models.champion_for_cycle(cycle_id)
    if (baseline.version if baseline else None) != (scored.version if scored else None):
        raise RetrainError(f"{cfg.name}: the champion changed to "
                           f"{'v' + baseline.version if baseline else 'none'} during the "
                           "cycle; re-run the evaluate stage")
    tags = {c.version: models.get_version(c.version).tags for c in candidates}
    if all(t.get("decision") for t in tags.values()):
        # A rerun of a finished cycle, or of one stopped while it promoted: every candidate
        # was already decided. The report keeps what the first run decided, and an alias
        # move that the stopped run did not get to is made now.
        promoted = [v for v, t in tags.items() if t.get("decision") == "promoted"]
        if promoted:
            models.finish_promotion(promoted[0])
        current = models.champion()
        return PromotionResult(
            versions=versions, promoted_version=promoted[0] if promoted else None, reused=True,
            previous_champion=baseline.version if baseline else None,
            champion_version=current.version if current else None,
            champion_uri=models.model_uri() if current else None, decisions={
                v: GateRecord(promote=t.get("decision") == "promoted",
                              reason=t.get("decision_reason", "")) for v, t in tags.items()})
    outcome = models.promote_if_better(candidates, scored.metrics.headline() if scored else None,
                                       cfg.promotion)
    new = models.champion()
    return PromotionResult(
        versions=versions, promoted_version=outcome.promoted_version,
        previous_champion=outcome.previous_champion,
        champion_version=new.version if new else None,
        champion_uri=models.model_uri() if new else None,
        decisions={v: GateRecord(promote=d.promote, reason=d.reason)
                   for v, d in outcome.decisions.items()})
