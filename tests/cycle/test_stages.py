"""The stages of a cycle as plain functions, without Airflow: trigger, assembly, evaluation,
promotion, the report, and what happens when MLflow does not answer.

Real components: MLflow's registry in a SQLite file, local storage and S3 over HTTP (moto's
server), and, for a server that fails, a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from retrain_lib.core.config import ObjectTypeConfig, parse_object_type_config
from retrain_lib.core.errors import RegistryUnavailable, RetrainError
from retrain_lib.core.layout import (
    CATALOG_MANIFEST,
    catalog_scene_key,
    cycle_state_key,
    incoming_prefix,
    report_key,
)
from retrain_lib.cycle import data, mining, models, report, trigger
from retrain_lib.cycle.results import (
    AssembledDataset,
    ChampionScores,
    CycleStages,
    Evaluation,
    ModelScores,
    PromotionResult,
    TrainedCandidate,
    TriggerDecision,
)
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.stages.registry import ModelRegistry
from tests.conftest import free_port
from tests.stages.test_registry import training_run

CFG: ObjectTypeConfig = parse_object_type_config({
    "name": "vehicle", "classes": ["car", "truck"],
    "trigger": {"min_new_annotations": 50, "max_days_without_training": 7}})


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> CycleSettings:
    """Settings on either storage backend, with an MLflow registry in a SQLite file."""
    mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if request.param == "local":
        return CycleSettings(storage_uri=str(tmp_path / "storage"), mlflow_uri=mlflow,
                             scratch=str(tmp_path / "scratch"))
    bucket = request.getfixturevalue("s3_bucket")
    return CycleSettings(storage_uri=f"s3://{bucket}/root", mlflow_uri=mlflow,
                         scratch=str(tmp_path / "scratch"))


def _catalog(settings: CycleSettings, scene_id: str, objects: int = 3) -> None:
    settings.storage().put_json(catalog_scene_key(CFG.name, scene_id, CATALOG_MANIFEST), {
        "scene_id": scene_id, "objects": objects, "region": "a", "scene_sha256": scene_id})


def _decision(retrain: bool) -> TriggerDecision:
    return TriggerDecision(retrain=retrain, reason="because", new_annotations=0,
                           pending_drops=[], untrained_scenes=0, days_since_training=None)


# -- 1. the trigger --------------------------------------------------------------------------


def test_the_days_based_trigger_retrains_once_enough_days_passed(settings: CycleSettings
                                                                 ) -> None:
    storage = settings.storage()
    _catalog(settings, "old-scene")
    trained_at = datetime(2026, 3, 1, tzinfo=UTC)
    storage.put_json(cycle_state_key(CFG.name), {
        "trained_scenes": ["old-scene"], "last_trained_at": trained_at.isoformat(),
        "last_cycle_id": "c0", "last_dataset_version": "ds-0"})
    # A drop with too few annotations for the count-based trigger.
    storage.put_json(f"{incoming_prefix(CFG.name)}/d1/s.geojson",
                     {"type": "FeatureCollection", "features": [{}] * 4})

    early = trigger.check_new_data(CFG, settings, now=trained_at + timedelta(days=6))
    assert not early.retrain and early.new_annotations == 4
    assert early.reason == "only 4 new annotations (< 50) and 6.0 days since the last training"
    late = trigger.check_new_data(CFG, settings, now=trained_at + timedelta(days=7.5))
    assert late.retrain and late.days_since_training == 7.5
    assert late.reason == "7.5 days since the last training >= 7"
    forced = trigger.check_new_data(CFG, settings, force=True, now=trained_at)
    assert forced.retrain and forced.reason == "forced by the run's params"


def test_the_days_based_trigger_needs_some_data(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"))
    # Never trained and nothing dropped: no number of days makes a cycle.
    decision = trigger.check_new_data(CFG, settings, now=datetime(2030, 1, 1, tzinfo=UTC))
    assert not decision.retrain and decision.days_since_training is None
    assert decision.reason == "only 0 new annotations (< 50) and never trained"


# -- 5. assemble ----------------------------------------------------------------------------


def test_assembly_refuses_scenes_that_were_not_tiled(settings: CycleSettings) -> None:
    _catalog(settings, "tiled")
    _catalog(settings, "forgotten")
    settings.storage().put_json(f"{data.scene_shard_prefix(CFG, 'tiled')}/index.json",
                                {"scene_id": "tiled", "tiles": []})
    with pytest.raises(RetrainError, match="scenes not tiled yet: forgotten; run the tile "
                                           "stage first"):
        data.assemble(CFG, settings, "c1")


def test_an_empty_catalog_stops_the_tile_stage_with_the_reason(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"))
    with pytest.raises(RetrainError, match="the catalog is empty: every drop was quarantined"):
        data.scenes_to_tile(CFG, settings)


# -- 7. and 8. evaluate, register and promote ------------------------------------------------


def _dataset(test_scenes: list[str]) -> AssembledDataset:
    return AssembledDataset(object_type=CFG.name, version="ds-1", prefix="datasets/vehicle/ds-1",
                            data_yaml_key="datasets/vehicle/ds-1/data.yaml", train_images=4,
                            val_images=1, test_scenes=test_scenes, reused=False, url="u",
                            scene_ids=["s1"], hard_shards=0)


def _scores(map50_95: float, map50: float) -> ModelScores:
    return ModelScores.model_validate({
        "map50_95": map50_95, "map50": map50, "map75": None, "map_small": None,
        "map_medium": None, "map_large": None, "precision": None, "recall": None,
        "per_class": {}, "counts": {"scenes": 1, "truth": 1, "pred": 1, "pred_total": 1,
                                    "tp": 1, "fp": 0, "fn": 0},
        "iou_threshold": 0.5, "conf_threshold": 0.25, "area_ranges": None,
        "classes": list(CFG.classes), "notes": []})


def _trained(registry: ModelRegistry, tmp_path: Path, candidate: str) -> TrainedCandidate:
    """A real MLflow run with weights, as the train stage leaves it."""
    return TrainedCandidate(mlflow_run_id=training_run(registry, tmp_path, candidate),
                            weights_uri=str(tmp_path / candidate / "best.pt"), metrics={},
                            epochs_run=1, wall_time_s=1.0, resumed=False, candidate=candidate)


def test_an_empty_test_set_is_a_clear_error(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"),
                             mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RetrainError, match="the frozen test set is empty; a region needs at "
                                           "least two scenes"):
        models.evaluate_models(CFG, settings, _dataset([]), [], cycle_id="c1")


def test_a_champion_that_changed_during_the_cycle_stops_promotion(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"),
                             mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    registry = ModelRegistry(CFG.registered_model_name, settings.tracking_uri)
    first = _trained(registry, tmp_path, "first")
    version = registry.register_candidate(first.mlflow_run_id, cycle_id="c0")
    registry.set_champion(version, "the first model")
    # The cycle evaluated against v1; meanwhile somebody promoted another version by hand.
    evaluation = Evaluation(test_scenes=["t1"], candidates={"new": _scores(0.6, 0.8)},
                            champion=ChampionScores(version=version, metrics=_scores(0.3, 0.5)))
    other = _trained(registry, tmp_path, "other")
    registry.set_champion(registry.register_candidate(other.mlflow_run_id, cycle_id="x"),
                          "a hotfix")
    new = _trained(registry, tmp_path, "new")
    with pytest.raises(RetrainError, match="the champion changed to v2 during the cycle; "
                                           "re-run the evaluate stage"):
        models.register_and_promote(CFG, settings, "c1", _dataset(["t1"]), [new], evaluation)
    assert registry.champion().version == "2"  # type: ignore[union-attr]

    # Evaluated against the champion in place, the gate runs and moves the alias.
    evaluation = Evaluation(test_scenes=["t1"], candidates={"new": _scores(0.6, 0.8)},
                            champion=ChampionScores(version="2", metrics=_scores(0.3, 0.5)))
    promotion = models.register_and_promote(CFG, settings, "c1", _dataset(["t1"]), [new],
                                            evaluation)
    assert promotion.promoted_version == "3" and promotion.previous_champion == "2"
    assert promotion.decisions["3"].promote
    # A re-run of the same cycle is still measured against v2, the champion it started
    # with, not against its own v3; it finds every candidate decided and changes nothing; what
    # it hands on still says that this cycle promoted v3 over v2.
    assert registry.champion_for_cycle("c1").version == "2"  # type: ignore[union-attr]
    assert registry.champion_for_cycle("c2").version == "3"  # type: ignore[union-attr]
    again = models.register_and_promote(CFG, settings, "c1", _dataset(["t1"]), [new],
                                        evaluation)
    assert again.reused and again.promoted_version == "3" and again.champion_version == "3"
    assert again.decisions["3"].promote and again.previous_champion == "2"


def test_the_trigger_says_which_drops_are_empty(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"),
                             mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "storage" / incoming_prefix(CFG.name) / "upload-1").mkdir(parents=True)
    decision = trigger.check_new_data(CFG, settings)
    assert not decision.retrain and decision.empty_drops == ["upload-1"]
    assert decision.reason.endswith("; drop(s) upload-1 empty, waiting for files")
    written = report.record_skip(CFG, settings, "c1", decision)
    assert written is not None
    saved = settings.storage().get_json(report_key(CFG.name, "c1"))
    assert saved["check"]["empty_drops"] == ["upload-1"]


# -- 9. the report ---------------------------------------------------------------------------


def _promotion(promoted: str | None) -> PromotionResult:
    return PromotionResult(versions={"base": "1"}, promoted_version=promoted,
                           champion_version=promoted,
                           decisions={"1": {"promote": bool(promoted), "reason": "r"}})


@pytest.mark.parametrize(("stages", "status"), [
    ({"check": _decision(False)}, "skipped"),
    ({"check": _decision(True)}, "incomplete"),
    ({"check": _decision(True), "promotion": _promotion(None)}, "completed"),
    ({"check": _decision(True), "promotion": _promotion("1")}, "promoted"),
])
def test_the_report_status_says_how_far_the_cycle_got(settings: CycleSettings,
                                                      stages: dict[str, Any],
                                                      status: str) -> None:
    written = report.write_report(CFG, settings, "c1", CycleStages(**stages))
    storage = settings.storage()
    saved = storage.get_json(report_key(CFG.name, "c1"))
    assert written.status == status == saved["status"]
    assert saved["check"]["reason"] == "because" and "started_at" not in saved["check"]
    # Only a cycle that reached the gate counts as a training for the trigger policy.
    assert storage.exists(cycle_state_key(CFG.name)) == ("promotion" in stages)
    markdown = storage.get_bytes(report_key(CFG.name, "c1").replace(".json", ".md")).decode()
    assert f"- status: {status}" in markdown


def test_a_skipped_rerun_keeps_the_report_of_the_cycle(settings: CycleSettings) -> None:
    stages = CycleStages(check=_decision(True), promotion=_promotion("1"))
    report.write_report(CFG, settings, "c1", stages)
    assert report.record_skip(CFG, settings, "c1", _decision(False)) is None
    saved = settings.storage().get_json(report_key(CFG.name, "c1"))
    assert saved["status"] == "promoted" and saved["promotion"]["promoted_version"] == "1"
    assert report.record_skip(CFG, settings, "c2", _decision(False)).status == "skipped"


# -- MLflow that does not answer -------------------------------------------------------------


class _FailingMlflow(http.server.BaseHTTPRequestHandler):
    """An MLflow address that answers every request with 503, as a server being replaced."""

    def _fail(self) -> None:
        body = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE",
                           "message": "overloaded"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _fail

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def failing_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("server", ["down", "failing"])
def test_mlflow_not_answering_is_an_error_not_a_missing_champion(
        server: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    uri = (f"http://127.0.0.1:{free_port()}" if server == "down"
           else request.getfixturevalue("failing_mlflow"))
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"), mlflow_uri=uri,
                             scratch=str(tmp_path / "scratch"))
    _catalog(settings, "s1")
    where = f"MLflow (tracking server )?(at )?{uri}"
    # Mining is not skipped as if there were no champion ...
    with pytest.raises(RegistryUnavailable, match=where):
        mining.mine(CFG, settings, "c1", ["s1"])
    # ... and training does not cold-start from the initial model.
    with pytest.raises(RegistryUnavailable, match=where):
        models.train_candidate(CFG, settings, "c1", _dataset(["t1"]), "default")
    assert not settings.storage().list("models")


def test_no_champion_yet_is_not_an_error(tmp_path: Path) -> None:
    settings = CycleSettings(storage_uri=str(tmp_path / "storage"),
                             mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    summary = mining.mine(CFG, settings, "c1", ["s1"])
    assert summary.skipped == "no champion yet: nothing to learn from"
    assert summary.to_json() == {"skipped": "no champion yet: nothing to learn from",
                                 "counts": {}}


def test_stage_results_survive_the_xcom_round_trip() -> None:
    stages = CycleStages(check=_decision(True), promotion=_promotion("1"),
                         dataset=_dataset(["t1"]))
    text = json.dumps(stages.to_json())
    assert CycleStages.from_json(json.loads(text)) == stages
