"""The demo's pieces: its config, its folder, its tables, and the local stack's settings.

The two-cycle demo itself trains for minutes, so it is measured (README, docs/operations.md)
rather than run here; tests/airflow/test_dags.py runs the same DAG through ``LocalStack.run_dag``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.config import load_object_type_config, parse_object_type_config
from retrain_lib.core.errors import ConfigError
from retrain_lib.cycle.results import CycleReport
from retrain_lib.devtools.demo import (
    DEMO_MARKER,
    DemoSize,
    _prepare_root,
    decision_lines,
    demo_config,
    model_rows,
    summary_rows,
)
from retrain_lib.devtools.local_stack import LocalStack, project_folders, up_stack

DAGS, PLUGINS, SHIPPED = project_folders()


def test_demo_config_is_the_shipped_one_scaled_down() -> None:
    shipped = load_object_type_config(SHIPPED / "vehicle.yaml")
    cfg = parse_object_type_config(demo_config(shipped, DemoSize(epochs=7)), "demo")
    assert cfg.classes == shipped.classes and cfg.promotion == shipped.promotion
    assert cfg.schedule == shipped.schedule and cfg.name == "vehicle"
    assert cfg.tiling.tile_size == 256 == cfg.training.imgsz
    assert cfg.training.epochs == 7 and cfg.training.device == "cpu"
    assert [c.name for c in cfg.training.candidates] == ["demo"]
    assert cfg.runner.kind == "local" and cfg.trigger.min_new_annotations == 10


def test_demo_size_is_checked() -> None:
    with pytest.raises(ConfigError, match="--scenes: got 1; expected at least 2"):
        DemoSize(scenes=1)
    with pytest.raises(ConfigError, match="--size: got 128"):
        DemoSize(size=128)
    with pytest.raises(ConfigError, match="--finetune-epochs: got 0"):
        DemoSize(finetune_epochs=0)


def test_demo_root_is_cleaned_but_foreign_files_are_never_deleted(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    _prepare_root(root)
    assert (root / DEMO_MARKER).exists()
    (root / "storage" / "catalog").mkdir(parents=True)
    (root / "mlflow.db").write_bytes(b"old")
    (root / "notes.txt").write_text("mine")  # not a demo output: kept
    _prepare_root(root)
    assert not (root / "storage").exists() and not (root / "mlflow.db").exists()
    assert (root / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "storage").mkdir()
    with pytest.raises(ConfigError, match="holds files the demo did not make"):
        _prepare_root(foreign)
    assert (foreign / "storage").is_dir()


def test_cli_demo_refuses_a_foreign_folder_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(app, ["demo", "--root", str(tmp_path), "--configs",
                                      str(SHIPPED)])
    assert result.exit_code == 2
    assert "holds files the demo did not make" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def _scores(map50: float, map50_95: float, arid_map50: float) -> dict[str, Any]:
    return {"map50_95": map50_95, "map50": map50, "map75": None, "map_small": None,
            "map_medium": None, "map_large": None, "precision": None, "recall": None,
            "per_class": {}, "counts": {"scenes": 2, "truth": 9, "pred": 9, "pred_total": 9,
                                     "tp": 9, "fp": 0, "fn": 0},
            "iou_threshold": 0.5, "conf_threshold": 0.25,
            "area_ranges": None, "classes": ["car"], "notes": [],
            "regions": {"arid": {"map50_95": None, "map50": arid_map50, "precision": None,
                                 "recall": None}}}


def _report(**changes: Any) -> CycleReport:
    return CycleReport.from_json({
        "cycle_id": "c1", "object_type": "vehicle", "status": "promoted",
        "written_at": "2026-01-01T00:00:00+00:00", "code_version": "0.1.0",
        "check": {"retrain": True, "reason": "192 new annotations >= 10",
                  "new_annotations": 192, "pending_drops": [], "untrained_scenes": 2,
                  "days_since_training": None},
        "ingest": {"object_type": "vehicle", "cataloged": 1, "quarantined": 1,
                   "scene_ids": ["a-1", "a-2"], "new_annotations": 192, "drops": []},
        "tiles": [{"scene_id": "a-1", "shard": "s1", "tiles_written": 16, "reused": False},
                  {"scene_id": "a-2", "shard": "s2", "tiles_written": 16, "reused": True}],
        "mine": {"counts": {"false_negative": 60, "false_positive": 3}},
        "dataset": {"object_type": "vehicle", "version": "ds-1", "prefix": "d",
                    "data_yaml_key": "d/data.yaml", "train_images": 248, "val_images": 32,
                    "test_scenes": ["a-0", "b-0"], "reused": False, "url": "d",
                    "scene_ids": [], "hard_shards": 0},
        "evaluation": {"test_scenes": ["a-0", "b-0"],
                       "candidates": {"demo": _scores(0.97, 0.67, 0.99)},
                       "champion": {"version": "1", "metrics": _scores(0.5, 0.28, 0.1)}},
        "promotion": {"versions": {"demo": "2"}, "promoted_version": "2",
                      "champion_version": "2",
                      "decisions": {"2": {"promote": True, "reason": "gain +0.39"}}},
        **changes})


REPORT = _report()


def test_cycle_tables() -> None:
    rows = dict(summary_rows(REPORT))
    assert rows["new scenes"] == "2 cataloged, 1 drop(s) quarantined"
    assert rows["chips"] == "16 new (32 over 2 scenes)"
    assert rows["hard examples"] == "60 false negative, 3 false positive"
    assert rows["dataset"].startswith("ds-1: 248 train / 32 val images")
    assert [label for label, _ in model_rows(REPORT)] == ["candidate demo (v2)", "champion v1"]
    assert decision_lines(REPORT) == ["promoted v2 to champion", "v2: gain +0.39"]
    timed = _report(stage_times={stage: {"wall_s": s, "busy_s": s, "parts": 1}
                                 for stage, s in (("train", 30.0), ("ingest", 6.0),
                                                  ("evaluate", 4.0))})
    assert dict(summary_rows(timed))["time per stage"] == (
        "ingest 6.0 s, train 30.0 s, evaluate 4.0 s; outside training 10 s (25%)")
    skipped = CycleReport.from_json({
        "cycle_id": "c0", "object_type": "vehicle", "status": "skipped", "written_at": "t",
        "code_version": "0.1.0", "check": {
            "retrain": False, "reason": "only 3 new annotations (< 10)", "new_annotations": 3,
            "pending_drops": [], "untrained_scenes": 0, "days_since_training": None}})
    assert decision_lines(skipped) == ["no training: only 3 new annotations (< 10)"]
    assert list(summary_rows(skipped)) == [("chips", "0 new (0 over 0 scenes)"),
                                           ("hard examples", "none")]
    first = _report(promotion={"versions": {"demo": "1"}, "promoted_version": None,
                               "champion_version": None, "decisions": {
                                   "1": {"promote": False, "reason": "below the floor"}}})
    assert decision_lines(first)[0] == "no champion yet"


def test_local_stack_points_everything_under_its_root(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")  # the caller's Airflow
    stack = LocalStack(root=tmp_path, dags_folder=DAGS, plugins_folder=PLUGINS,
                       configs_dir=SHIPPED, task_retries=0)
    env = stack.process_env()
    assert env["AIRFLOW_HOME"] == str(tmp_path / "airflow")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path}/airflow/airflow.db"
    assert "AIRFLOW__CORE__EXECUTOR" not in env  # the caller's settings do not leak in
    assert env["AUTORETRAIN_STORAGE"] == str(tmp_path / "storage")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert env["AUTORETRAIN_TASK_RETRIES"] == "0"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_up_serves_the_demo_configs_once_the_demo_made_them(tmp_path: Path) -> None:
    assert up_stack(tmp_path).configs_dir == SHIPPED.resolve()
    (tmp_path / "configs").mkdir()
    stack = up_stack(tmp_path, airflow_port=8181, mlflow_port=5151)
    assert stack.configs_dir == (tmp_path / "configs").resolve()
    env = stack.environment()
    assert env["AIRFLOW__API__PORT"] == "8181"
    assert env["AUTORETRAIN_MLFLOW_UI_URL"] == "http://127.0.0.1:5151"
    assert json.loads(json.dumps(env))  # plain strings only, for subprocesses


@pytest.mark.slow
def test_up_serves_airflow_with_the_dags_and_mlflow_until_sigterm(tmp_path: Path) -> None:
    """``autoretrain up`` as a user starts it: both UIs answer with the shipped DAGs, then
    SIGTERM (what a service manager sends) stops every process it started."""
    import subprocess
    import time
    import urllib.request

    from tests.conftest import free_port, wait_for_port
    from tests.core.test_processes import sigterm_stops_every_process

    airflow_port, mlflow_port = free_port(), free_port()
    root = tmp_path / "stack"

    def get(port: int, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("autoretrain")), "up", "--root", str(root),
         "--airflow-port", str(airflow_port), "--mlflow-port", str(mlflow_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    marker = f"AIRFLOW_HOME={root.resolve() / 'airflow'}"
    try:
        wait_for_port(mlflow_port, timeout_s=240)
        wait_for_port(airflow_port, timeout_s=240)
        dags: dict[str, bool] = {}
        deadline = time.monotonic() + 180
        while len(dags) < 4 and time.monotonic() < deadline:  # parsed a moment after start
            with contextlib.suppress(OSError):
                dags = {d["dag_id"]: d["is_paused"]
                        for d in get(airflow_port, "/api/v2/dags")["dags"]}
            time.sleep(3)
        # No login for the local stack; both shipped types, paused until someone toggles them.
        assert dags == {"retrain_vehicle": True, "detect_vehicle": True,
                        "retrain_aircraft": True, "detect_aircraft": True}
        plugins = [p["name"] for p in get(airflow_port, "/api/v2/plugins")["plugins"]]
        assert "autoretrain" in plugins
        assert "experiments" in get(mlflow_port, "/api/2.0/mlflow/experiments/search"
                                                 "?max_results=10")
        sigterm_stops_every_process(proc, marker)  # MLflow's and Airflow's servers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
