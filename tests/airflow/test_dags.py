"""The DAGs through real Airflow: parsing, the task graph, and whole runs with ``dag.test()``.

Airflow runs in subprocesses (``airflow dags test``, ``airflow db migrate``...) with their own
``AIRFLOW_HOME``, so these tests never touch the user's Airflow settings. The metadata database
is a fresh PostgreSQL database on 127.0.0.1:5432 when one answers (and must be in CI, where
``CI`` is set), else SQLite.

One scenario runs the retraining DAG of a tiny config (128 px chips, 64 px training, 1 epoch)
through two cycles, a re-run of the same logical date, a run without new data, and the detect
DAG; cycle 2's training is killed with SIGKILL mid-run, and Airflow's retry must finish it. (A
rerun of a finished cycle without new data keeps its report: ``tests/cycle/test_stages.py``.) The
tests below check what each run left behind. The scenario runs on the embedded default: local
storage, MLflow in a SQLite file, ``dag.test()``. The same DAGs on the compose stack's path
(storage on S3 over HTTP, an MLflow server with S3 artifacts, the scheduler and Celery
workers) run in ``tests/devtools/test_service_stack.py``; every check here reads storage
through the storage layer all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from retrain_lib.core.storage import LocalStorage, S3Settings, S3Storage, Storage
from retrain_lib.devtools.local_stack import DagRunOutcome, LocalStack, project_folders
from tests.conftest import (
    drop_region,
    good_and_bad_drops,
    metadata_database,
    put_folder,
    storage_backend,
)

DAGS, PLUGINS, SHIPPED_CONFIGS = project_folders()
HEAVY_MODULES = ("torch", "ultralytics", "mlflow", "rasterio", "kubernetes")
RETRAIN_EDGES = {
    "check_new_data": {"ingest", "select_candidates", "report", "release_cycle"},
    "ingest": {"list_scenes", "report"},
    "list_scenes": {"tile"},
    "tile": {"mine", "report"},
    "mine": {"assemble", "report"},
    "assemble": {"train", "evaluate", "register_and_promote", "report"},
    "select_candidates": {"train"},
    "train": {"evaluate", "register_and_promote", "report"},
    "evaluate": {"register_and_promote", "report"},
    "register_and_promote": {"report"},
    "report": {"publish_champion"},
    "publish_champion": {"release_cycle"},
    "release_cycle": set(),  # a teardown: the run's state stays that of its stages
}
DETECT_EDGES = {"waiting_scenes": {"serving_model", "detect_scene"},
                "serving_model": {"detect_scene"}, "detect_scene": set()}
TINY_CONFIG: dict[str, Any] = {
    "name": "vehicle",
    "classes": ["car", "truck"],
    "schedule": "@daily",
    "trigger": {"min_new_annotations": 5, "max_days_without_training": 7},
    "tiling": {"tile_size": 128, "overlap": 0.1},
    "training": {"epochs": 1, "imgsz": 64, "batch": 8, "workers": 0,
                 "candidates": [{"name": "a"}, {"name": "b", "overrides": {"mosaic": 0.0}}]},
    "mining": {"max_per_scene": 4, "oversample": 1},
    # One-epoch models score about 0: a floor of 0 makes cycle 1 promote, and a required gain
    # of 1.0 makes cycle 2 keep the champion, whatever the noise.
    "promotion": {"absolute_floor": 0.0, "min_improvement": 1.0},
}


def _stack(root: Path, configs: Path, metadata_url: str, *, retries: int | None = 0,
           retry_delay_s: float | None = None, storage: str | None = None,
           s3: S3Settings | None = None, mlflow_uri: str | None = None) -> LocalStack:
    yolo = root / "yolo-config"
    yolo.mkdir(parents=True, exist_ok=True)
    return LocalStack(root=root, dags_folder=DAGS, plugins_folder=PLUGINS, configs_dir=configs,
                      database_url=metadata_url, task_retries=retries,
                      task_retry_delay_s=retry_delay_s, storage=storage, s3=s3,
                      mlflow_uri=mlflow_uri,
                      extra_env={"YOLO_CONFIG_DIR": str(yolo), "YOLO_OFFLINE": "1",
                                 "MPLBACKEND": "Agg"})


# --------------------------------------------------------------------------- parsing


PARSE_SCRIPT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    out["dags"][dag.dag_id] = {
        "edges": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
        "timetable": type(dag.timetable).__name__,
        "cron": getattr(dag.timetable, "expression", None),
        "tags": sorted(dag.tags), "owner": dag.owner, "max_active_runs": dag.max_active_runs,
        "catchup": dag.catchup, "paused": dag.is_paused_upon_creation,
        "start_tz": str(dag.start_date.tzinfo), "params": sorted(dag.params),
        "doc_md": dag.doc_md or "",
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "queues": {t.task_id: t.queue for t in dag.tasks},
        "pools": {t.task_id: t.pool for t in dag.tasks},
        "backoff": {t.task_id: t.retry_exponential_backoff for t in dag.tasks},
        "outlets": {t.task_id: [a.uri for a in t.outlets] for t in dag.tasks},
        "extra_links": {t.task_id: sorted(l.name for l in t.operator_extra_links)
                        for t in dag.tasks},
        "mapped": sorted(t.task_id for t in dag.tasks
                         if type(t).__name__.endswith("MappedOperator")),
    }
out["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print("RESULT " + json.dumps(out))
"""


def _parse_dags(stack: LocalStack, heavy: tuple[str, ...] = ()) -> dict[str, Any]:
    """The DAG folder parsed by Airflow's DagBag with ``stack``'s settings, in a fresh process;
    ``heavy`` names the modules whose import at parse time is reported."""
    proc = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, str(DAGS), ",".join(heavy)],
                          env=stack.process_env(), cwd=stack.root, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The DAG folder parsed over the shipped configs."""
    home = tmp_path_factory.mktemp("airflow-parse")
    return _parse_dags(_stack(home, SHIPPED_CONFIGS, f"sqlite:///{home / 'airflow.db'}",
                              retries=None), HEAVY_MODULES)


def test_every_config_yields_a_retrain_and_a_detect_dag(parsed: dict[str, Any]) -> None:
    assert parsed["import_errors"] == {}
    types = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
    assert sorted(parsed["dags"]) == sorted([f"retrain_{t}" for t in types]
                                            + [f"detect_{t}" for t in types])


def test_retrain_dag_graph_and_settings(parsed: dict[str, Any]) -> None:
    from retrain_lib.core.config import load_object_type_config

    for path in SHIPPED_CONFIGS.glob("*.yaml"):
        cfg = load_object_type_config(path)
        dag = parsed["dags"][f"retrain_{cfg.name}"]
        assert {k: set(v) for k, v in dag["edges"].items()} == RETRAIN_EDGES
        assert dag["mapped"] == ["tile", "train"]
        assert dag["timetable"] == "CronTriggerTimetable"
        assert dag["cron"] == {"@daily": "0 0 * * *"}.get(cfg.schedule, cfg.schedule)
        assert dag["max_active_runs"] == 1 and dag["catchup"] is False and dag["paused"] is True
        assert dag["start_tz"] == "UTC" and dag["owner"] == cfg.owner
        assert {"autoretrain", "retrain", cfg.name, *cfg.tags} == set(dag["tags"])
        assert dag["params"] == ["candidates", "epochs", "force"]
        # The operator's documentation carries this type's numbers and how to drive the DAG.
        assert f"# Retrain `{cfg.name}`" in dag["doc_md"] and "Trigger with config" in dag["doc_md"]
        assert f"at least {cfg.trigger.min_new_annotations} new annotated" in dag["doc_md"]
        # Every step retries with exponential backoff (3 unless the environment says).
        assert set(dag["retries"].values()) == {3}
        assert set(dag["backoff"].values()) == {2.0}
        assert dag["outlets"]["publish_champion"] == [f"x-autoretrain://{cfg.name}/champion"]
        assert [t for t, uris in dag["outlets"].items() if uris] == ["publish_champion"]
        assert dag["extra_links"]["train"] == ["MLflow"]
        assert dag["extra_links"]["register_and_promote"] == ["MLflow"]
        assert dag["extra_links"]["evaluate"] == []


def test_detect_dag_graph_and_schedule(parsed: dict[str, Any]) -> None:
    dag = parsed["dags"]["detect_vehicle"]
    assert {k: set(v) for k, v in dag["edges"].items()} == DETECT_EDGES
    assert dag["mapped"] == ["detect_scene"]
    # Runs on time *and* when the champion Asset is updated.
    assert dag["timetable"] == "AssetOrTimeSchedule"
    assert dag["max_active_runs"] == 1 and dag["paused"] is True


def test_parsing_imports_no_heavy_module(parsed: dict[str, Any]) -> None:
    assert parsed["heavy"] == []


@pytest.mark.parametrize(("broken", "expected"), [
    ({**TINY_CONFIG, "name": "ship", "schedule": "often"}, "ship.yaml: schedule: got 'often'"),
    ("name: ship\nclasses: [ship\n", "ship.yaml: not valid YAML"),
])
def test_a_broken_config_is_an_import_error_and_the_other_types_keep_their_dags(
        tmp_path: Path, broken: dict[str, Any] | str, expected: str) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    (configs / "ship.yaml").write_text(broken if isinstance(broken, str)
                                       else yaml.safe_dump(broken))
    result = _parse_dags(_stack(tmp_path / "stack", configs,
                                f"sqlite:///{tmp_path / 'airflow.db'}"))
    # Each DAG file shows one import error that names the broken file and what is wrong...
    assert sorted(Path(k).name for k in result["import_errors"]) == ["detect.py", "retrain.py"]
    for error in result["import_errors"].values():
        assert expected in error and "Traceback" not in error
        assert error.startswith("ConfigError: 1 object-type config(s)")
    # ...and the valid type keeps both its DAGs.
    assert sorted(result["dags"]) == ["detect_vehicle", "retrain_vehicle"]


def test_trainings_go_to_their_queue_and_pool(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(
        {**TINY_CONFIG, "runner": {"queue": "train", "pool": "gpus"}}))
    result = _parse_dags(_stack(tmp_path / "stack", configs,
                                f"sqlite:///{tmp_path / 'airflow.db'}"))
    dag = result["dags"]["retrain_vehicle"]
    assert dag["queues"]["train"] == "train" and dag["pools"]["train"] == "gpus"
    # Every other task stays on the default queue and pool.
    assert {q for t, q in dag["queues"].items() if t != "train"} == {"default"}
    assert {p for t, p in dag["pools"].items() if t != "train"} == {"default_pool"}


PLUGIN_SCRIPT = """
import json
from airflow import plugins_manager
[info] = [p for p in plugins_manager.get_plugin_info() if p["name"] == "autoretrain"]
links = [{"name": link.name, "xcom_key": link.xcom_key,
          "operators": [o.__name__ for o in link.operators]}
         for link in plugins_manager.get_operator_extra_links()]
print("RESULT " + json.dumps({"errors": plugins_manager.get_import_errors(), "links": links,
                              "views": info["external_views"]}))
"""


def test_plugin_loads_and_registers_the_mlflow_link(tmp_path: Path) -> None:
    stack = _stack(tmp_path, SHIPPED_CONFIGS, f"sqlite:///{tmp_path / 'airflow.db'}")
    env = {**stack.process_env(), "AUTORETRAIN_MLFLOW_UI_URL": "http://mlflow.example:5000"}
    proc = subprocess.run([sys.executable, "-c", PLUGIN_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["errors"] == {}
    # The worker stores the URL under this key; the API server reads it for the button.
    assert result["links"] == [{"name": "MLflow", "xcom_key": "_link_MlflowLink",
                                "operators": []}]
    assert result["views"] == [{"name": "MLflow", "href": "http://mlflow.example:5000",
                                "destination": "nav", "category": "browse"}]


# --------------------------------------------------------------------------- whole runs


@dataclass
class Scenario:
    """What the runs of the scenario left behind."""

    backend: str
    stack: LocalStack
    runs: dict[str, DagRunOutcome] = field(default_factory=dict)
    states: dict[str, dict[str, str]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: dict[str, dict[tuple[str, int], str]] = field(default_factory=dict)
    markdown: dict[str, str] = field(default_factory=dict)
    bad_drop: dict[str, bytes] = field(default_factory=dict)
    killed_trainers: list[int] = field(default_factory=list)
    try_numbers: dict[str, int] = field(default_factory=dict)

    @property
    def storage(self) -> Storage:
        return self.stack.open_storage()

    def report(self, run: str) -> dict[str, Any]:
        """The cycle report as the run left it (a re-run of its cycle rewrites the file)."""
        return self.reports[run]


def _snapshot(storage: Storage) -> dict[str, tuple[int, str]]:
    """(size, when written) of every object that ingest, tiling, mining and assembly wrote."""
    out: dict[str, tuple[int, str]] = {}
    tops = ("incoming", "catalog", "quarantine", "chips", "hard", "datasets")
    if isinstance(storage, LocalStorage):
        for top in tops:
            for path in sorted((storage.root / top).rglob("*")):
                if path.is_file() and not path.name.endswith(".cache"):
                    stat = path.stat()
                    out[str(path.relative_to(storage.root))] = (stat.st_size,
                                                                str(stat.st_mtime_ns))
        return out
    import boto3

    assert isinstance(storage, S3Storage)
    settings = storage.settings
    client = boto3.client("s3", endpoint_url=settings.endpoint_url,
                          region_name=settings.region_name,
                          aws_access_key_id=settings.aws_access_key_id,
                          aws_secret_access_key=settings.aws_secret_access_key)
    pages = client.get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=storage.bucket, Prefix=f"{storage.prefix}/"):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(storage.prefix) + 1:]
            if key.startswith(tops) and not key.endswith(".cache"):
                out[key] = (obj["Size"], f"{obj['LastModified'].isoformat()} {obj['ETag']}")
    return out


def _json_output(stdout: str) -> Any:
    """The JSON an ``airflow ... -o json`` command printed after its log lines."""
    start = next(i for i, line in enumerate(stdout.splitlines()) if line.startswith(("[{", "[]")))
    return json.loads("\n".join(stdout.splitlines()[start:]))


def _query(stack: LocalStack, sql: str, **params: Any) -> list[Any]:
    """Rows from the Airflow metadata database (what the UI and the API read)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(stack.metadata_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).fetchall())
    finally:
        engine.dispose()


def _task_states(stack: LocalStack, run: DagRunOutcome) -> dict[str, str]:
    rows = _query(stack, "SELECT task_id, map_index, state FROM task_instance "
                  "WHERE dag_id = :dag AND run_id = :run", dag=run.dag_id, run=run.run_id)
    return {task + (f"[{index}]" if index >= 0 else ""): state for task, index, state in rows}


def _links(stack: LocalStack, run: DagRunOutcome) -> dict[tuple[str, int], str]:
    """The URLs Airflow stored for the "MLflow" buttons of a run's tasks."""
    rows = _query(stack, "SELECT task_id, map_index, value FROM xcom WHERE dag_id = :dag AND "
                  "run_id = :run AND key = '_link_MlflowLink'", dag=run.dag_id, run=run.run_id)
    # PostgreSQL (JSONB) hands back the decoded string, SQLite the JSON text.
    return {(r[0], r[1]): json.loads(r[2]) if r[2].startswith('"') else r[2] for r in rows}


@pytest.fixture(scope="module", params=["local"])
def scenario(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp(f"dag-runs-{request.param}")
    configs = root / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    with metadata_database(root / "airflow.db") as metadata_url, \
            storage_backend(request.param, root, request) as backend:
        # One retry, soon: cycle 2's training is killed once, and Airflow must retry it.
        stack = _stack(root / "stack", configs, metadata_url, retries=1, retry_delay_s=1,
                       storage=(backend.storage_uri if backend.s3 else None), s3=backend.s3,
                       mlflow_uri=backend.mlflow_uri)
        stack.migrate()
        yield _run_scenario(request.param, stack, root)


def _run_scenario(backend: str, stack: LocalStack, root: Path) -> Scenario:
    out = Scenario(backend, stack)
    storage = stack.open_storage()
    incoming = "incoming/vehicle"

    def run(name: str, dag_id: str, day: int, conf: dict[str, Any] | None = None,
            on_line: Callable[[str], None] | None = None) -> None:
        outcome = stack.run_dag(dag_id, conf=conf, logical_date=datetime(2025, 6, day, tzinfo=UTC),
                                on_line=on_line)
        out.runs[name] = outcome
        out.states[name] = _task_states(stack, outcome)
        out.snapshots[name] = _snapshot(storage)
        out.links[name] = _links(stack, outcome)
        report = f"cycles/vehicle/{outcome.cycle_id}/report"
        if dag_id.startswith("retrain_"):
            assert storage.exists(f"{report}.json"), outcome.log.read_text()[-5000:]
            out.reports[name] = storage.get_json(f"{report}.json")
            out.markdown[name] = storage.get_bytes(f"{report}.md").decode()

    drops = root / "drops"
    good_and_bad_drops(drops)
    out.bad_drop = {p.name: p.read_bytes() for p in (drops / "bad").iterdir()}
    put_folder(storage, drops / "region-a", f"{incoming}/region-a")
    put_folder(storage, drops / "bad", f"{incoming}/bad")
    run("cycle1", "retrain_vehicle", 1)
    run("rerun", "retrain_vehicle", 1, {"force": True})  # the same logical date again
    run("nodata", "retrain_vehicle", 2)
    # Region B is first detected by the champion, then annotated and dropped for training:
    # cycle 2 mines the stored predictions instead of detecting again.
    drop_region(drops / "region-b", "arid", 3, seed=30)
    for scene in sorted((drops / "region-b").glob("*.tif")):
        storage.put_file(scene, f"inference/incoming/vehicle/{scene.name}")
    run("detect", "detect_vehicle", 3)
    put_folder(storage, drops / "region-b", f"{incoming}/region-b")
    run("cycle2", "retrain_vehicle", 4, {"candidates": ["a"], "epochs": 1},
        on_line=lambda line: _kill_training_once(line, out.killed_trainers))
    out.try_numbers = dict(_query(
        stack, "SELECT task_id, try_number FROM task_instance WHERE dag_id = :dag AND "
        "run_id = :run", dag="retrain_vehicle", run=out.runs["cycle2"].run_id))
    return out


def _kill_training_once(line: str, killed: list[int]) -> None:
    """SIGKILL the training process the first time its output says it started training."""
    if killed or "Starting training for" not in line:
        return
    for proc in psutil.Process().children(recursive=True):
        try:
            if "retrain_lib.training" in " ".join(proc.cmdline()):
                proc.kill()
                killed.append(proc.pid)
        except psutil.NoSuchProcess:
            continue


def _registry(scenario: Scenario) -> Any:
    from retrain_lib.stages.registry import ModelRegistry

    return ModelRegistry("autoretrain-vehicle", scenario.stack.tracking_uri)


@pytest.mark.slow
def test_cycle_one_catalogs_quarantines_trains_and_promotes(scenario: Scenario) -> None:
    run = scenario.runs["cycle1"]
    assert run.state == "success", run.log
    states = scenario.states["cycle1"]
    assert set(states.values()) == {"success"}
    assert {k for k in states if k.startswith(("tile[", "train["))} == {
        "tile[0]", "tile[1]", "tile[2]", "train[0]", "train[1]"}
    storage = scenario.storage
    after = scenario.snapshots["cycle1"]
    catalog = sorted({k.split("/")[3] for k in after if k.startswith("catalog/vehicle/scenes/")})
    assert catalog == ["region-a-s0", "region-a-s1", "region-a-s2"]
    # The planted bad drop is quarantined whole, byte for byte, with its reason.
    quarantine = "quarantine/vehicle/bad"
    reason = storage.get_json(f"{quarantine}/reason.json")
    assert any("boat" in p["problem"] for p in reason["problems"])
    for name, data in scenario.bad_drop.items():
        assert storage.get_bytes(f"{quarantine}/{name}") == data
    assert not [k for k in after if k.startswith("incoming/")]  # both drops left incoming

    report = scenario.report("cycle1")
    assert report["status"] == "promoted"
    assert report["ingest"]["cataloged"] == 1 and report["ingest"]["quarantined"] == 1
    assert len(report["tiles"]) == 3 and all(t["tiles_written"] > 0 for t in report["tiles"])
    assert report["mine"]["skipped"].startswith("no champion yet")
    assert set(report["evaluation"]["candidates"]) == {"a", "b"}
    assert "vegetated" in report["evaluation"]["candidates"]["a"]["regions"]
    promoted = report["promotion"]["promoted_version"]
    assert promoted in {"1", "2"}
    assert f"Promotion: v{promoted}; champion is v{promoted}." in scenario.markdown["cycle1"]
    versions = [v for v in _registry(scenario).list_versions()
                if v.tags["cycle_id"] == run.cycle_id]
    assert [v.version for v in versions] == ["1", "2"]
    assert {v.tags["candidate"] for v in versions} == {"a", "b"}
    assert _registry(scenario).champion().version == promoted  # cycle 2 kept it
    datasets = {k.split("/")[2] for k in after if k.startswith("datasets/vehicle/ds-")}
    assert len(datasets) == 1
    assert f"datasets/vehicle/{datasets.pop()}/data.yaml" in after


@pytest.mark.slow
def test_every_run_gives_the_cycle_lock_back(scenario: Scenario) -> None:
    from retrain_lib.cycle.lock import lock_state

    lock = lock_state(scenario.storage, "vehicle")
    assert lock is not None and lock.released and lock.cycle_id == scenario.runs["cycle2"].cycle_id
    for name in ("cycle1", "rerun", "cycle2"):
        assert scenario.states[name]["release_cycle"] == "success", scenario.states[name]
    # A run that decided not to retrain never took it: its teardown is skipped with it.
    assert scenario.states["nodata"]["release_cycle"] == "skipped"


def test_promotion_updates_the_champion_asset(scenario: Scenario) -> None:
    assert scenario.states["cycle1"]["publish_champion"] == "success"
    assert scenario.states["cycle2"]["publish_champion"] == "skipped"
    rows = _query(scenario.stack, "SELECT e.extra FROM asset_event e JOIN asset a ON "
                  "a.id = e.asset_id WHERE a.uri = 'x-autoretrain://vehicle/champion'")
    assert len(rows) == 1  # one promotion, one event: not on the re-run, not in cycle 2
    extra = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
    assert extra["version"] == scenario.report("cycle1")["promotion"]["promoted_version"]


@pytest.mark.slow
def test_train_and_register_tasks_link_to_mlflow(scenario: Scenario) -> None:
    from mlflow import MlflowClient

    links = scenario.links["cycle1"]
    assert set(links) == {("train", 0), ("train", 1), ("register_and_promote", -1)}
    client = MlflowClient(scenario.stack.tracking_uri)
    for version in _registry(scenario).list_versions()[:2]:
        index = 0 if version.tags["candidate"] == "a" else 1
        experiment = client.get_run(version.run_id).info.experiment_id
        assert links[("train", index)] == (f"http://127.0.0.1:5000/#/experiments/{experiment}"
                                           f"/runs/{version.run_id}")
    promoted = scenario.report("cycle1")["promotion"]["promoted_version"]
    assert links[("register_and_promote", -1)] == (
        f"http://127.0.0.1:5000/#/models/autoretrain-vehicle/versions/{promoted}")
    # A re-run that reuses the trained candidates links to the same runs.
    assert {k: v for k, v in scenario.links["rerun"].items() if k[0] == "train"} == {
        k: v for k, v in links.items() if k[0] == "train"}


@pytest.mark.slow
def test_rerun_of_the_same_logical_date_duplicates_nothing(scenario: Scenario) -> None:
    first, again = scenario.runs["cycle1"], scenario.runs["rerun"]
    assert again.state == "success", again.log
    assert again.cycle_id == first.cycle_id == "2025-06-01T00-00-00Z"
    # Same catalog, chips, datasets and quarantine: same files, not even rewritten.
    assert scenario.snapshots["rerun"] == scenario.snapshots["cycle1"]
    assert [v.version for v in _registry(scenario).list_versions()
            if v.tags["cycle_id"] == first.cycle_id] == ["1", "2"]
    report = scenario.report("rerun")
    assert report["check"]["reason"] == "forced by the run's params"
    # The cycle's ingest is the first run's: the rerun found no drop, and still names them.
    assert report["ingest"] == scenario.report("cycle1")["ingest"]
    assert all(t["reused"] for t in report["tiles"])
    assert report["dataset"]["reused"] is True
    assert all(t["reused"] for t in report["trained"])
    # The report is history: the re-run keeps the first run's promotion, and does not
    # announce it again.
    assert report["promotion"]["reused"] is True and report["status"] == "promoted"
    first_promotion = scenario.report("cycle1")["promotion"]
    assert report["promotion"]["promoted_version"] == first_promotion["promoted_version"]
    assert report["promotion"]["decisions"] == first_promotion["decisions"]
    assert scenario.states["rerun"]["publish_champion"] == "skipped"


@pytest.mark.slow
def test_run_without_new_data_is_skipped_and_says_why(scenario: Scenario) -> None:
    run = scenario.runs["nodata"]
    assert run.state == "success", run.log  # skipped runs do not fail
    assert set(scenario.states["nodata"].values()) == {"skipped"}
    report = scenario.report("nodata")
    assert report["status"] == "skipped"
    assert report["check"]["reason"].startswith("only 0 new annotations (< 5)")
    assert "only 0 new annotations" in run.log.read_text()
    assert scenario.snapshots["nodata"] == scenario.snapshots["rerun"]


@pytest.mark.slow
def test_detect_dag_writes_predictions_for_dropped_scenes(scenario: Scenario) -> None:
    run = scenario.runs["detect"]
    assert run.state == "success", run.log
    assert scenario.states["detect"] == {
        "waiting_scenes": "success", "serving_model": "success", "detect_scene[0]": "success",
        "detect_scene[1]": "success", "detect_scene[2]": "success"}
    champion = scenario.report("cycle1")["promotion"]["promoted_version"]
    storage = scenario.storage
    folder = f"predictions/vehicle/{champion}"
    for scene in ("s0", "s1", "s2"):
        doc = storage.get_json(f"{folder}/{scene}.geojson")
        assert doc["type"] == "FeatureCollection" and "crs" in doc
        assert {f["properties"]["model_version"] for f in doc["features"]} <= {champion}
        assert storage.exists(f"inference/done/vehicle/{scene}.tif")
    assert len([k for k in storage.list(f"{folder}/by-sha256/") if k.endswith(".json")]) == 3
    assert not [k for k in storage.list("inference/incoming/") if k.endswith(".tif")]


@pytest.mark.slow
def test_cycle_two_mines_stored_predictions_fine_tunes_and_gates(scenario: Scenario) -> None:
    run = scenario.runs["cycle2"]
    assert run.state == "success", run.log
    # Its training was killed with SIGKILL mid-run; Airflow retried the task, which trained
    # again and registered one version.
    assert len(scenario.killed_trainers) == 1
    assert scenario.try_numbers["train"] == 2, scenario.try_numbers
    assert {t: n for t, n in scenario.try_numbers.items() if t != "train"} == {
        t: 1 for t in scenario.try_numbers if t != "train"}, scenario.try_numbers
    assert "training process" in run.log.read_text()
    states = scenario.states["cycle2"]
    assert [k for k in states if k.startswith("train")] == ["train[0]"]  # params: candidate a
    report = scenario.report("cycle2")
    champion = scenario.report("cycle1")["promotion"]["promoted_version"]
    assert report["status"] == "completed"
    # The two new arid training scenes (the third joined the frozen test set) were mined with
    # the predictions the detect DAG stored before they were annotated.
    mined = report["mine"]
    assert mined["model_version"] == champion and len(mined["scenes"]) == 2
    assert all(s.startswith("region-b-") for s in mined["scenes"])
    log = run.log.read_text()
    assert log.count(f"with stored predictions of v{champion}") == 2
    assert "detecting now" not in log
    assert scenario.storage.exists(f"hard/vehicle/{run.cycle_id}/manifest.json")
    [trained] = report["trained"]
    assert trained["candidate"] == "a" and trained["epochs_run"] == 1
    assert trained["parent_version"] == champion  # warm start from the champion
    evaluation = report["evaluation"]
    assert evaluation["champion"]["version"] == champion
    assert set(evaluation["candidates"]["a"]["regions"]) == {"vegetated", "arid"}
    decision = report["promotion"]["decisions"]["3"]
    assert decision["promote"] is False and "required 1.0000" in decision["reason"]
    versions = _registry(scenario).list_versions()
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert versions[2].tags["decision"] == "rejected" and versions[2].parent == champion
    assert _registry(scenario).champion().version == champion
    assert len([d for d in scenario.storage.list_children("datasets/vehicle/")
                if d.startswith("ds-")]) == 2


@pytest.mark.slow
def test_airflow_lists_no_import_errors(scenario: Scenario) -> None:
    stack = scenario.stack
    stack.airflow("dags", "reserialize")
    assert _json_output(stack.airflow("dags", "list-import-errors", "-o", "json").stdout) == []
    listed = _json_output(stack.airflow("dags", "list", "-o", "json").stdout)
    assert {d["dag_id"] for d in listed} == {"retrain_vehicle", "detect_vehicle"}



def _autoretrain(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``autoretrain`` command as a user runs it against the scenario's storage and MLflow
    (in a terminal wide enough that tables do not wrap the cycle ids)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("autoretrain")), *args, "--configs",
         str(stack.configs_dir), "--mlflow-uri", stack.tracking_uri],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "COLUMNS": "400"})


@pytest.mark.slow
def test_a_detection_of_the_cycle_two_model_traces_back_to_the_arid_drop(
        scenario: Scenario, tmp_path: Path) -> None:
    from retrain_lib.stages.chip_index import read_chip_index

    storage = scenario.storage
    assert isinstance(storage, LocalStorage)
    cycle2 = scenario.runs["cycle2"].cycle_id
    version = scenario.report("cycle2")["promotion"]["versions"]["a"]
    dataset = _registry(scenario).get_version(version).tags["dataset_version"]
    chips = read_chip_index(storage.path(f"datasets/vehicle/{dataset}/chips.gpkg"))
    hard_scene = next(c.scene_id for c in chips if c.source == "hard")
    # Cycle 2's model detects on an arid scene it trained on (low threshold: one epoch).
    scene = tmp_path / f"{hard_scene}.tif"
    scene.write_bytes(storage.get_bytes(f"catalog/vehicle/scenes/{hard_scene}/scene.tif"))
    out = tmp_path / "detections.geojson"
    detect = subprocess.run(
        [str(Path(sys.executable).with_name("autoretrain")), "detect", str(scene), "--model",
         f"models:/autoretrain-vehicle/{version}", "--out", str(out), "--conf", "0.001",
         "--mlflow-uri", scenario.stack.tracking_uri],
        capture_output=True, text=True, timeout=600, check=False)
    assert detect.returncode == 0, detect.stderr[-3000:]
    features = json.loads(out.read_text())["features"]
    assert features and features[0]["properties"]["model_version"] == version
    feature = _detection_on_a_chip(out, [c for c in chips if c.scene_id == hard_scene])
    traced = _autoretrain(scenario.stack, "trace", "vehicle", str(out), "--feature", feature,
                          "--storage", str(storage.root), "--json")
    assert traced.returncode == 0, traced.stderr[-3000:]
    chain = json.loads(traced.stdout)
    links = list(_walk(chain))
    assert {link["status"] for link in links} == {"ok"}, traced.stdout
    model = next(link for link in links if link["kind"] == "model_version")
    assert model["details"]["version"] == version and model["details"]["cycle_id"] == cycle2
    assert model["details"]["decision"] == "rejected"
    [weights, *_] = [link for link in links if link["kind"] == "weights"]
    assert "(checked)" in weights["title"]
    # The chips it names hold the detection's place and come from the arid drop.
    lon, lat = chain["details"]["centre_lonlat"]
    dataset_link = next(link for link in model["children"] if link["kind"] == "dataset")
    named = [link["details"] for link in _walk(dataset_link) if link["kind"] == "chip"]
    assert named
    for chip in named:
        west, south, east, north = chip["bounds_lonlat"]
        assert west <= lon <= east and south <= lat <= north
        assert chip["scene_id"] == hard_scene
    drops = {link["details"]["drop_id"] for link in _walk(dataset_link)
             if link["kind"] == "drop"}
    assert drops == {"region-b"}
    # The scene's hard chips were mined in cycle 2, from the cycle-1 champion's mistakes.
    wide = _autoretrain(scenario.stack, "trace", "vehicle", str(out), "--feature", feature,
                        "--radius", "1000", "--ancestors", "0", "--storage",
                        str(storage.root), "--json")
    assert wide.returncode == 0, wide.stderr[-3000:]
    hard = [link["details"] for link in _walk(json.loads(wide.stdout))
            if link["kind"] == "chip" and link["details"]["source"] == "hard"]
    champion = scenario.report("cycle1")["promotion"]["promoted_version"]
    assert hard and {(c["mining_cycle"], c["mined_with_version"]) for c in hard} == {
        (cycle2, champion)}
    # The warm start leads to the cycle-1 champion, trained on the vegetated drop only.
    parent = next(link for link in links if link["title"].startswith("warm-started from"))
    assert parent["details"]["version"] == champion
    assert {link["details"]["drop_id"] for link in _walk(parent) if link["kind"] == "drop"
            } <= {"region-a"}


def _detection_on_a_chip(predictions: Path, chips: list[Any]) -> str:
    """The index of a detection whose centre lies on one of ``chips`` (a hard one if any)."""
    import shapely

    from retrain_lib.geo.crs import WGS84, reproject_geometries
    from retrain_lib.geo.geojson import read_geojson

    features, crs = read_geojson(predictions)
    centres = reproject_geometries([f.geometry.centroid for f in features], crs, WGS84)
    for chip in sorted(chips, key=lambda c: c.source != "hard"):
        for i, centre in enumerate(centres):
            if shapely.box(*chip.bounds_lonlat).covers(centre):
                return str(i)
    raise AssertionError(f"no detection of {predictions} lies on a chip")


def _walk(link: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield link
    for child in link["children"]:
        yield from _walk(child)


@pytest.mark.slow
def test_reports_time_every_stage_and_history_lists_the_cycles(scenario: Scenario) -> None:
    times = scenario.report("cycle1")["stage_times"]
    assert set(times) == {"check", "ingest", "tile", "mine", "assemble", "train", "evaluate",
                          "register"}
    # One record per mapped task: three scenes tiled, two candidates trained.
    assert (times["tile"]["parts"], times["train"]["parts"]) == (3, 2)
    assert all(t["wall_s"] > 0 for t in times.values())
    assert "- time per stage: check " in scenario.markdown["cycle1"]
    storage = scenario.storage
    assert isinstance(storage, LocalStorage)
    listed = _autoretrain(scenario.stack, "history", "vehicle", "--storage", str(storage.root),
                          "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    history = json.loads(listed.stdout)
    rows = {row["cycle_id"]: row for row in history["cycles"]}
    cycle1, cycle2 = (scenario.runs[name].cycle_id for name in ("cycle1", "cycle2"))
    assert rows[cycle1]["status"] == "promoted" and rows[cycle2]["status"] == "completed"
    assert rows[scenario.runs["nodata"].cycle_id]["status"] == "skipped"
    assert [q["drop_id"] for q in rows[cycle1]["quarantined"]] == ["bad"]
    assert rows[cycle2]["hard_by_reason"] and rows[cycle2]["stage_seconds"]["train"] > 0
    champion = scenario.report("cycle1")["promotion"]["promoted_version"]
    [event] = history["champion_timeline"]
    assert (event["version"], event["by"], event["current"]) == (
        champion, f"the gate of cycle {cycle1}", True)
    table = _autoretrain(scenario.stack, "history", "vehicle", "--storage", str(storage.root))
    assert table.returncode == 0 and cycle2 in table.stdout, table.stderr[-3000:]
