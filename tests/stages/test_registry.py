"""Promotion against a real MLflow backend (a SQLite file, as in the embedded default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain_lib.core.config import GuardMetric, PromotionConfig
from retrain_lib.core.errors import ConfigError, RetrainError
from retrain_lib.stages.registry import Candidate, ModelRegistry, decide_promotion

RULE = PromotionConfig(primary_metric="map50_95", min_improvement=0.01,
                       guards=[GuardMetric(metric="map50", tolerance=0.02)],
                       absolute_floor=0.2)


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow SQLite database; copying it skips the migrations in every test."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    ModelRegistry("autoretrain-test", f"sqlite:///{path}").client.search_experiments()
    return path


@pytest.fixture()
def registry(tmp_path: Path, empty_mlflow_db: Path) -> ModelRegistry:
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    return ModelRegistry("autoretrain-test", f"sqlite:///{db}")


def training_run(registry: ModelRegistry, tmp_path: Path, name: str) -> str:
    """A real MLflow run with weights at weights/best.pt, as the training step logs it."""
    client = registry.client
    experiment = client.get_experiment_by_name("train")
    experiment_id = (experiment.experiment_id if experiment else client.create_experiment(
        "train", artifact_location=(tmp_path / "artifacts").as_uri()))
    run = client.create_run(experiment_id, run_name=name)
    weights = tmp_path / name / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(name.encode())
    client.log_artifact(run.info.run_id, str(weights), artifact_path="weights")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def register(registry: ModelRegistry, tmp_path: Path, name: str, **metrics: float) -> Candidate:
    version = registry.register_candidate(training_run(registry, tmp_path, name),
                                          metrics=metrics, dataset_version="ds1", cycle_id="c1")
    return Candidate(version, metrics)


def test_first_model_above_the_floor_is_promoted(registry: ModelRegistry,
                                                  tmp_path: Path) -> None:
    cand = register(registry, tmp_path, "a", map50_95=0.3, map50=0.6)
    outcome = registry.promote_if_better([cand], None, RULE)
    assert outcome.promoted_version == cand.version
    champion = registry.champion()
    assert champion is not None and champion.version == cand.version
    assert champion.tags["decision"] == "promoted"
    assert "floor" in champion.tags["decision_reason"]


def test_first_model_below_the_floor_is_rejected(registry: ModelRegistry,
                                                  tmp_path: Path) -> None:
    cand = register(registry, tmp_path, "a", map50_95=0.1, map50=0.3)
    outcome = registry.promote_if_better([cand], None, RULE)
    assert not outcome.promoted
    assert registry.champion() is None
    info = registry.get_version(cand.version)
    assert info.tags["decision"] == "rejected"
    assert "0.1000 < 0.2000" in info.tags["decision_reason"]


def test_improving_challenger_replaces_the_champion(registry: ModelRegistry,
                                                    tmp_path: Path) -> None:
    first = register(registry, tmp_path, "a", map50_95=0.30, map50=0.60)
    registry.promote_if_better([first], None, RULE)
    better = register(registry, tmp_path, "b", map50_95=0.35, map50=0.61)
    outcome = registry.promote_if_better([better], {"map50_95": 0.30, "map50": 0.60}, RULE)
    assert outcome.promoted_version == better.version
    assert outcome.previous_champion == first.version
    assert registry.champion().version == better.version  # type: ignore[union-attr]
    assert registry.get_version(better.version).tags["replaced_version"] == first.version


def test_a_tie_does_not_promote(registry: ModelRegistry, tmp_path: Path) -> None:
    first = register(registry, tmp_path, "a", map50_95=0.30, map50=0.60)
    registry.promote_if_better([first], None, RULE)
    tie = register(registry, tmp_path, "b", map50_95=0.305, map50=0.60)
    outcome = registry.promote_if_better([tie], {"map50_95": 0.30, "map50": 0.60}, RULE)
    assert not outcome.promoted
    assert registry.champion().version == first.version  # type: ignore[union-attr]
    reason = registry.get_version(tie.version).tags["decision_reason"]
    assert "gain +0.0050 < required 0.0100" in reason


def test_a_broken_guard_blocks_promotion(registry: ModelRegistry, tmp_path: Path) -> None:
    first = register(registry, tmp_path, "a", map50_95=0.30, map50=0.60)
    registry.promote_if_better([first], None, RULE)
    risky = register(registry, tmp_path, "b", map50_95=0.40, map50=0.55)
    outcome = registry.promote_if_better([risky], {"map50_95": 0.30, "map50": 0.60}, RULE)
    assert not outcome.promoted
    reason = registry.get_version(risky.version).tags["decision_reason"]
    assert "guard broken" in reason and "map50 dropped 0.0500 > tolerance 0.0200" in reason


def test_champion_is_judged_on_fresh_numbers(registry: ModelRegistry, tmp_path: Path) -> None:
    # Registered with a high score, but this cycle's re-evaluation is what counts.
    first = register(registry, tmp_path, "a", map50_95=0.50, map50=0.80)
    registry.promote_if_better([first], None, RULE)
    challenger = register(registry, tmp_path, "b", map50_95=0.40, map50=0.70)
    with pytest.raises(RetrainError, match="re-evaluate"):
        registry.promote_if_better([challenger], None, RULE)
    fresh = {"map50_95": 0.30, "map50": 0.69}
    outcome = registry.promote_if_better([challenger], fresh, RULE)
    assert outcome.promoted_version == challenger.version
    assert registry.get_version(first.version).metrics["map50_95"] == pytest.approx(0.30)


def test_best_passing_candidate_wins_and_others_say_why(registry: ModelRegistry,
                                                        tmp_path: Path) -> None:
    a = register(registry, tmp_path, "a", map50_95=0.35, map50=0.6)
    b = register(registry, tmp_path, "b", map50_95=0.45, map50=0.7)
    c = register(registry, tmp_path, "c", map50_95=0.10, map50=0.2)
    outcome = registry.promote_if_better([a, b, c], None, RULE)
    assert outcome.promoted_version == b.version
    assert "scored higher" in registry.get_version(a.version).tags["decision_reason"]
    assert "floor" in registry.get_version(c.version).tags["decision_reason"]
    # The outcome says what the tags say: one promotion, and why each other version lost.
    assert {v: d.promote for v, d in outcome.decisions.items()} == {
        a.version: False, b.version: True, c.version: False}
    assert outcome.decisions[a.version].reason == (
        registry.get_version(a.version).tags["decision_reason"])


def test_rollback_and_manual_promotion(registry: ModelRegistry, tmp_path: Path) -> None:
    first = register(registry, tmp_path, "a", map50_95=0.30, map50=0.60)
    registry.promote_if_better([first], None, RULE)
    second = register(registry, tmp_path, "b", map50_95=0.40, map50=0.70)
    registry.promote_if_better([second], {"map50_95": 0.30, "map50": 0.60}, RULE)

    previous = registry.rollback(first.version, "false alarms in production")
    assert previous == second.version
    champion = registry.champion()
    assert champion is not None and champion.version == first.version
    assert champion.tags["decision"] == "rolled_back"
    assert "false alarms" in champion.tags["decision_reason"]

    with pytest.raises(ConfigError, match="reason is required"):
        registry.set_champion(second.version, "  ")
    with pytest.raises(RetrainError, match="has no version 99"):
        registry.rollback(99, "typo")
    registry.set_champion(second.version, "re-checked by analysts")
    assert registry.champion().version == second.version  # type: ignore[union-attr]


def test_registration_is_idempotent_and_keeps_lineage(registry: ModelRegistry,
                                                      tmp_path: Path) -> None:
    run_id = training_run(registry, tmp_path, "a")
    v1 = registry.register_candidate(run_id, metrics={"map50_95": 0.3}, cycle_id="c1")
    again = registry.register_candidate(run_id, metrics={"map50_95": 0.3}, cycle_id="c1")
    assert v1 == again
    child = registry.register_candidate(training_run(registry, tmp_path, "b"),
                                        parent_version=v1, dataset_version="ds2")
    versions = registry.list_versions()
    assert [v.version for v in versions] == [v1, child]
    assert versions[1].parent == v1
    assert versions[1].tags["dataset_version"] == "ds2"
    assert versions[0].metrics == {"map50_95": pytest.approx(0.3)}


def test_champion_uri_resolves_to_the_weights(registry: ModelRegistry, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from retrain_lib.stages.weights import resolve_model

    cand = register(registry, tmp_path, "a", map50_95=0.3, map50=0.6)
    registry.promote_if_better([cand], None, RULE)
    # MLflow's own resolver, pointed at the registry through the environment (set globally,
    # the URIs would leak into every later test) ...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.tracking_uri)
    local = mlflow.artifacts.download_artifacts(registry.model_uri(),
                                                dst_path=str(tmp_path / "dl"))
    assert (Path(local) / "weights" / "best.pt").read_bytes() == b"a"
    # ... and the project's, which every stage uses.
    ref = resolve_model(registry.model_uri(), tracking_uri=registry.tracking_uri,
                        cache_dir=tmp_path / "cache")
    assert ref.weights.read_bytes() == b"a" and ref.registered
    assert (ref.name, ref.version) == (registry.model_name, cand.version)


def test_unknown_run_is_a_clear_error(registry: ModelRegistry) -> None:
    with pytest.raises(RetrainError, match="run deadbeef not found"):
        registry.register_candidate("deadbeef")


def test_gate_needs_the_primary_metric() -> None:
    with pytest.raises(RetrainError, match="no usable 'map50_95'"):
        decide_promotion({"map50": 0.5}, None, RULE)


def test_gate_threshold_is_inclusive() -> None:
    decision = decide_promotion({"map50_95": 0.31, "map50": 0.60},
                                {"map50_95": 0.30, "map50": 0.62}, RULE)
    assert decision.promote
    assert decision.primary_delta == pytest.approx(0.01)
    assert decision.guard_deltas["map50"] == pytest.approx(-0.02)


def test_cli_models_promote_rollback(registry: ModelRegistry, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retrain_lib.cli import app

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "test.yaml").write_text("name: test\nclasses: [car]\n")
    first = register(registry, tmp_path, "a", map50_95=0.3, map50=0.6)
    second = register(registry, tmp_path, "b", map50_95=0.2, map50=0.5)
    registry.promote_if_better([first], None, RULE)
    common = ["--configs", str(configs), "--mlflow-uri", registry.tracking_uri]
    runner = CliRunner()

    def run(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, [*args, *common])

    listing = run("models", "test")
    assert listing.exit_code == 0, listing.output
    assert "champion" in listing.output and "0.3000" in listing.output
    promoted = run("promote", "test", "--version", second.version, "--reason", "manual check")
    assert promoted.exit_code == 0, promoted.output
    assert registry.champion().version == second.version  # type: ignore[union-attr]
    back = run("rollback", "test", "--to", first.version, "--reason", "regression")
    assert back.exit_code == 0, back.output
    assert registry.champion().version == first.version  # type: ignore[union-attr]
    missing = run("rollback", "test", "--to", "42", "--reason", "x")
    assert missing.exit_code == 1
    assert "has no version 42" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)
