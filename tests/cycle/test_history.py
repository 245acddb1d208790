"""A type's history (one row per cycle, the champion's timeline) and the time each stage
took, on both storage backends."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from retrain_lib.cli.app import app
from retrain_lib.core.layout import report_key
from retrain_lib.cycle import report
from retrain_lib.cycle.history import load_history
from retrain_lib.cycle.results import (
    ChampionScores,
    CycleStages,
    Evaluation,
    IngestSummary,
    MiningSummary,
    TiledScene,
)
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.cycle.timing import stage_times, timed_stage
from retrain_lib.stages.ingest import DropOutcome, Problem
from retrain_lib.stages.registry import ModelRegistry
from tests.cycle.test_stages import CFG, _dataset, _decision, _promotion, _scores, settings
from tests.stages.test_registry import training_run

__all__ = ["settings"]  # the fixture: local storage and S3


def test_each_stage_run_is_timed_once_and_a_failed_attempt_not_at_all(
        settings: CycleSettings) -> None:
    storage = settings.storage()
    with pytest.raises(RuntimeError), timed_stage(storage, "vehicle", "c1", "ingest"):
        raise RuntimeError("the first attempt fails")
    assert stage_times(storage, "vehicle", "c1") == {}
    with timed_stage(storage, "vehicle", "c1", "ingest"):
        time.sleep(0.2)
    for scene in ("s1", "s2"):
        with timed_stage(storage, "vehicle", "c1", "tile", scene):
            time.sleep(0.1)
    # A rerun that reuses the work in no time keeps the first run's times.
    with timed_stage(storage, "vehicle", "c1", "ingest"):
        pass
    times = stage_times(storage, "vehicle", "c1")
    assert list(times) == ["ingest", "tile"]
    assert times["ingest"].parts == 1 and times["ingest"].wall_s >= 0.2
    tile = times["tile"]
    assert tile.parts == 2 and tile.busy_s >= 0.2 and tile.wall_s >= tile.busy_s - 0.01


def _stages(promoted: str | None) -> CycleStages:
    bad = DropOutcome("bad-drop", "quarantined",
                      problems=(Problem("s0.geojson", "feature 0: unknown class 'boat'"),))
    good = DropOutcome("good-drop", "cataloged", scene_ids=("a-s0", "a-s1"), annotations=12)
    return CycleStages(
        started_at="2026-12-01T02:00:00+00:00", check=_decision(True),
        ingest=IngestSummary(object_type="vehicle", cataloged=1, quarantined=1,
                             scene_ids=["a-s0", "a-s1"], new_annotations=12,
                             drops=[good, bad]),
        tiles=[TiledScene(scene_id=s, shard=f"chips/{s}", reused=False, tiles_written=5)
               for s in ("a-s0", "a-s1")],
        mine=MiningSummary(counts={"false_positive": 3, "false_negative": 2}),
        dataset=_dataset(["a-s1"]),
        evaluation=Evaluation(test_scenes=["a-s1"], candidates={"base": _scores(0.4, 0.7)},
                              champion=ChampionScores(version="1", metrics=_scores(0.3, 0.6))),
        promotion=_promotion(promoted))


def test_the_history_has_a_row_per_cycle_and_names_broken_reports(
        settings: CycleSettings, tmp_path: Path) -> None:
    storage = settings.storage()
    registry = ModelRegistry(CFG.registered_model_name, settings.tracking_uri)
    for run in ("r1", "r2"):
        registry.register_candidate(training_run(registry, tmp_path, run), cycle_id="c1")
    registry.set_champion("1", "first")
    registry.set_champion("2", "better on arid")
    registry.rollback("1", "regression on vegetated")
    with timed_stage(storage, "vehicle", "c1", "train", "base"):
        pass
    report.write_report(CFG, settings, "c1", _stages("1"))
    report.record_skip(CFG, settings, "c2", _decision(False))
    storage.put_bytes(report_key("vehicle", "c3"), b"{not json")
    storage.put_json(report_key("vehicle", "c4"), {"cycle_id": 4})
    storage.put_json("cycles/vehicle/c5/ingest.json", {"drops": []})

    history = load_history(CFG, settings)
    rows = {row.cycle_id: row for row in history.cycles}
    assert set(rows) == {"c1", "c2", "c3", "c4", "c5"}
    c1 = rows["c1"]
    assert not c1.problem and c1.status == "promoted" and c1.promoted_version == "1"
    assert (c1.new_scenes, c1.new_annotations, c1.chips) == (2, 12, 10)
    assert [(q.drop_id, q.problems) for q in c1.quarantined] == [
        ("bad-drop", ["s0.geojson: feature 0: unknown class 'boat'"])]
    assert c1.hard_by_reason == {"false_positive": 3, "false_negative": 2}
    assert c1.dataset_version == "ds-1"
    assert [(m.name, m.map50_95) for m in c1.models] == [("candidate base", 0.4),
                                                         ("champion v1", 0.3)]
    assert list(c1.stage_seconds) == ["train"]
    assert rows["c2"].status == "skipped" and rows["c2"].trigger == "because"
    assert "report.json cannot be read" in rows["c3"].problem
    assert "report.json is not a cycle report" in rows["c4"].problem
    assert rows["c5"].problem.startswith("no report.json")
    assert history.champion == "1"
    # Every move of the alias, in order, including the earlier promotion of the restored v1.
    timeline = history.champion_timeline
    assert [(e.version, e.action, e.replaced_version, e.current) for e in timeline] == [
        ("1", "promoted", "", False), ("2", "promoted", "1", False),
        ("1", "rolled_back", "2", True)]
    assert timeline[2].reason == "manual: regression on vegetated"
    assert {e.by for e in timeline} == {"by hand"}


def test_history_command_prints_the_table_and_the_json(settings: CycleSettings,
                                                       tmp_path: Path) -> None:
    report.write_report(CFG, settings, "c1", _stages(None))
    settings.storage().put_bytes(report_key("vehicle", "c2"), b"")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(
        {"name": "vehicle", "classes": ["car", "truck"]}))
    args = ["history", "vehicle", "--configs", str(configs), "--storage",
            settings.storage_uri, "--mlflow-uri", settings.tracking_uri]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "c1" in result.stdout and "completed" in result.stdout
    assert "report.json cannot be read" in " ".join(result.stdout.split())
    assert "no champion yet" in result.stdout
    as_json = CliRunner().invoke(app, [*args, "--json", "--last", "1"])
    doc = json.loads(as_json.stdout)
    assert [row["cycle_id"] for row in doc["cycles"]] == ["c2"]
