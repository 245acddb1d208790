"""The production path, end to end: the compose stack's services as real processes.

No image registry is reachable here, so ``docker compose up`` cannot run; the same services run
natively instead (``retrain_lib/devtools/service_stack.py``): PostgreSQL (127.0.0.1:5432) for
Airflow and MLflow, Redis (127.0.0.1:6379) as the Celery broker, the S3 server over HTTP, an
MLflow tracking server with a PostgreSQL backend and S3 artifacts, and Airflow's api-server,
scheduler, dag-processor and triggerer with the CeleryExecutor and two Celery workers: one
serves ``default``, the other ``default,train``.

The test drives it as users would: analysts' drops land in S3 for two object types, the DAGs
are unpaused through Airflow's REST API, and the scheduler runs them. The worker that trains
is killed with SIGKILL mid-training, with everything it started, and started again; Airflow
must find the lost task and retry it. ``make stack-test`` runs this file alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from retrain_lib.core.storage import S3Settings, Storage, open_storage
from retrain_lib.devtools.local_stack import project_folders
from retrain_lib.devtools.service_stack import COMPOSE_AIRFLOW_ENV, ServiceStack
from tests.conftest import (
    PLANTED_SECRET,
    REPO_ROOT,
    new_bucket,
    postgres_available,
    postgres_database,
)

DAGS, PLUGINS, _SHIPPED = project_folders()
TYPES = {"vehicle": ("car", "truck"), "aircraft": ("airplane", "helicopter")}
TRAIN_POOL = "training"


def _config(name: str, classes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": name, "classes": list(classes), "schedule": "@daily",
        "trigger": {"min_new_annotations": 5, "max_days_without_training": 7},
        "tiling": {"tile_size": 128, "overlap": 0.1},
        "training": {"epochs": 1, "imgsz": 64, "batch": 8, "workers": 0,
                     "candidates": [{"name": "a"}]},
        "mining": {"max_per_scene": 4, "oversample": 1},
        "promotion": {"absolute_floor": 0.0},  # one-epoch models score about 0
        "runner": {"kind": "local", "queue": "train", "pool": TRAIN_POOL},
    }


def _drop(folder: Path, classes: tuple[str, ...], scenes: int, seed: int) -> None:
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    make_drop(folder, [SceneSpec(scene_id=f"s{i}", width=256, height=256, region="vegetated",
                                 classes=classes, objects_per_class=3, decoys=2, seed=seed + i)
                       for i in range(scenes)])
    (folder / "drop.json").write_text('{"region": "vegetated"}')


def _put_folder(storage: Storage, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.put_file(path, f"{prefix}/{path.relative_to(folder).as_posix()}")


@dataclass
class StackRun:
    """What the stack did, for the checks below."""

    stack: ServiceStack
    storage: Storage
    databases: tuple[str, ...] = ()
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_instances: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    train_tries: list[dict[str, Any]] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    killed_training: str = ""
    seconds: float = 0.0


def _training_processes(stack: ServiceStack, worker: str) -> list[psutil.Process]:
    try:
        tree = psutil.Process(stack.worker_process(worker).pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in tree:
        try:
            if "retrain_lib.training" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[StackRun]:
    import redis

    if not postgres_available("the service-stack test"):
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432 (CI requires it)")
    root = tmp_path_factory.mktemp("service-stack")
    configs = root / "configs"
    configs.mkdir()
    for name, classes in TYPES.items():
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(_config(name, classes)))
    s3 = S3Settings(endpoint_url=request.getfixturevalue("s3_endpoint"),
                    region_name="us-east-1", aws_access_key_id="testing",
                    aws_secret_access_key=PLANTED_SECRET)
    bucket = new_bucket(s3, "stack")
    storage = open_storage(f"s3://{bucket}/data", s3=s3)
    # The analysts' drops, and scenes waiting for the champion's detections.
    for seed, (name, classes) in enumerate(TYPES.items()):
        _drop(root / "drops" / name, classes, 3, seed=10 * seed + 1)
        _put_folder(storage, root / "drops" / name, f"incoming/{name}/first-drop")
        _drop(root / "unlabelled" / name, classes, 1, seed=10 * seed + 7)
        storage.put_file(root / "unlabelled" / name / "s0.tif",
                         f"inference/incoming/{name}/waiting.tif")
    broker_db = 1 + uuid.uuid4().int % 15
    broker = redis.Redis(host="127.0.0.1", port=6379, db=broker_db)
    broker.ping()
    with postgres_database("autoretrain_airflow") as airflow_db, \
            postgres_database("autoretrain_mlflow") as mlflow_db:
        stack = ServiceStack(
            root=root / "stack", airflow_db_url=airflow_db,
            mlflow_backend_uri=mlflow_db,
            redis_url=f"redis://127.0.0.1:6379/{broker_db}",
            storage_uri=storage.uri, s3=s3, mlflow_artifacts=f"s3://{bucket}/mlflow",
            configs_dir=configs, dags_folder=DAGS, plugins_folder=PLUGINS,
            pools={TRAIN_POOL: 1},
            extra_env={
                # A lost worker's task is found within a minute, and retried a moment later.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "45",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "AUTORETRAIN_TASK_RETRIES": "2", "AUTORETRAIN_TASK_RETRY_DELAY_S": "2",
                # Sending a task to Redis can take over a second on a busy 2-core machine.
                "AIRFLOW__CELERY__OPERATION_TIMEOUT": "10",
                "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(root / "yolo-config"),
                "MPLBACKEND": "Agg"},
            log=lambda _m: None)
        try:
            with stack:
                out = _drive(stack, storage)
                out.databases = (airflow_db, mlflow_db)
                yield out
        finally:
            broker.flushdb()
            broker.close()


def _drive(stack: ServiceStack, storage: Storage) -> StackRun:
    out = StackRun(stack, storage)
    dag_ids = {f"{kind}_{name}" for name in TYPES for kind in ("retrain", "detect")}
    stack.wait_for_dags(dag_ids)
    started = time.monotonic()
    for dag_id in sorted(dag_ids):
        stack.unpause(dag_id)  # as ML ops toggle them in the UI

    def kill_the_trainer_once() -> None:
        if out.killed:
            return
        trainers = _training_processes(stack, "trainer")
        if trainers and time.time() - trainers[0].create_time() > 5:  # well into training
            out.killed_training = " ".join(trainers[0].cmdline())
            out.killed = stack.kill_worker("trainer")
            time.sleep(5)
            stack.start_worker("trainer")  # a worker serves the train queue again

    for name in TYPES:
        out.runs[f"retrain_{name}"] = stack.wait_for_run(
            f"retrain_{name}", where=lambda r: r["run_type"] == "scheduled",
            timeout_s=1500, on_wait=kill_the_trainer_once)
    out.seconds = time.monotonic() - started
    for name in TYPES:
        out.runs[f"detect_{name}"] = stack.wait_for_run(
            f"detect_{name}", where=lambda r: r["run_type"] == "asset_triggered", timeout_s=600)
    for dag_id, run in out.runs.items():
        out.task_instances[dag_id] = stack.task_instances(dag_id, run["dag_run_id"])
        for ti in out.task_instances[dag_id]:
            if ti["task_id"] == "train":
                out.train_tries += stack.api(
                    "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances/"
                    f"train/{ti['map_index']}/tries")["task_instances"]
    return out


def _when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
def test_the_scheduler_runs_both_types_to_a_promoted_champion_on_s3(stack_run: StackRun) -> None:
    from retrain_lib.stages.registry import ModelRegistry

    storage = stack_run.storage
    for name in TYPES:
        run = stack_run.runs[f"retrain_{name}"]
        assert run["state"] == "success", (name, run, stack_run.stack.logs)
        cycle = [k for k in storage.list(f"cycles/{name}/") if k.endswith("/report.json")]
        assert len(cycle) == 1, cycle
        report = storage.get_json(cycle[0])
        assert report["status"] == "promoted", report
        # No interference: each type cataloged its own drop, under its own model name.
        scenes = {k.split("/")[3] for k in storage.list(f"catalog/{name}/scenes/")}
        assert scenes == {f"first-drop-s{i}" for i in range(3)}
        registry = ModelRegistry(f"autoretrain-{name}", stack_run.stack.mlflow_url)
        versions = registry.list_versions()
        # One version per candidate, though a training was killed and retried.
        assert [v.tags["candidate"] for v in versions] == ["a"], versions
        champion = registry.champion()
        assert champion is not None
        assert champion.version == report["promotion"]["promoted_version"]
        assert champion.tags["decision"] == "promoted"
        assert {v.tags["cycle_id"] for v in versions} == {report["cycle_id"]}
        # Its metrics tags are what the cycle measured for its candidate.
        candidate = champion.tags["candidate"]
        measured = report["evaluation"]["candidates"][candidate]["map50_95"]
        assert champion.metrics["map50_95"] == pytest.approx(measured, abs=1e-6)
    # The weights are MLflow artifacts in S3, as the compose stack keeps them.
    artifacts = open_storage(stack_run.stack.mlflow_artifacts, s3=stack_run.stack.s3).list()
    assert len([k for k in artifacts if k.endswith("weights/best.pt")]) == 2, artifacts


@pytest.mark.slow
def test_a_promotion_runs_the_detect_dag_which_writes_predictions_to_s3(
        stack_run: StackRun) -> None:
    storage = stack_run.storage
    for name in TYPES:
        run = stack_run.runs[f"detect_{name}"]
        assert run["state"] == "success", run
        report = next(storage.get_json(k) for k in storage.list(f"cycles/{name}/")
                      if k.endswith("/report.json"))
        version = report["promotion"]["promoted_version"]
        assert storage.exists(f"predictions/{name}/{version}/waiting.geojson")
        assert storage.exists(f"inference/done/{name}/waiting.tif")


@pytest.mark.slow
def test_tasks_ran_on_both_workers_and_training_only_on_the_train_queue(
        stack_run: StackRun) -> None:
    hosts = {ti["hostname"] for tis in stack_run.task_instances.values() for ti in tis
             if ti["hostname"]}
    assert hosts == {"general", "trainer"}, hosts
    trains = [ti for dag in TYPES for ti in stack_run.task_instances[f"retrain_{dag}"]
              if ti["task_id"] == "train"]
    assert len(trains) == 2
    assert {(ti["queue"], ti["pool"], ti["hostname"]) for ti in trains} == {
        ("train", TRAIN_POOL, "trainer")}
    others = [ti for tis in stack_run.task_instances.values() for ti in tis
              if ti["task_id"] != "train" and ti["state"] == "success"]
    assert {ti["queue"] for ti in others} == {"default"}


@pytest.mark.slow
def test_the_pool_never_ran_more_trainings_at_once_than_it_has_slots(
        stack_run: StackRun) -> None:
    spans = sorted((_when(t["start_date"]), _when(t["end_date"]))
                   for t in stack_run.train_tries if t["start_date"] and t["end_date"])
    assert len(spans) >= 3  # two trainings, one of them twice
    ended = spans[0][1]
    for start, end in spans[1:]:
        assert start >= ended - 1.0, spans  # one slot: each starts after the others ended
        ended = max(ended, end)


@pytest.mark.slow
def test_a_training_worker_killed_mid_training_is_retried_and_the_cycle_ends_consistent(
        stack_run: StackRun) -> None:
    assert stack_run.killed, "the training worker was never killed"
    gone = [pid for pid in stack_run.killed if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert gone == []  # the worker and its training died with it
    retried = [t for t in stack_run.train_tries if t["try_number"] == 2]
    assert len(retried) == 1 and retried[0]["state"] == "success", stack_run.train_tries
    failed = [t for t in stack_run.train_tries if t["try_number"] == 1
              and t["task_id"] == retried[0]["task_id"]
              and t["map_index"] == retried[0]["map_index"]
              and t["dag_id"] == retried[0]["dag_id"]]
    assert [t["state"] for t in failed] == ["failed"], failed
    assert retried[0]["hostname"] == "trainer"


@pytest.mark.slow
def test_no_credential_appears_in_anything_the_stack_wrote(stack_run: StackRun) -> None:
    """The S3 secret key is planted in every service's environment; grep what they wrote."""
    import subprocess

    secret = PLANTED_SECRET.encode()
    leaks = [key for key in stack_run.storage.list()
             if secret in stack_run.storage.get_bytes(key)]
    artifacts = open_storage(stack_run.stack.mlflow_artifacts, s3=stack_run.stack.s3)
    leaks += [f"mlflow/{k}" for k in artifacts.list() if secret in artifacts.get_bytes(k)]
    # Task and service logs, Airflow's home, scratch.
    leaks += [str(p) for p in stack_run.stack.root.rglob("*") if p.is_file()
              and p.suffix not in (".tif", ".pt", ".jpg") and secret in p.read_bytes()]
    # Everything in Airflow's and MLflow's databases: XComs, rendered fields, params, tags.
    for url in stack_run.databases:
        dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres",
                               url.rsplit("/", 1)[1]], capture_output=True, check=True).stdout
        assert b"xcom" in dump or b"model_versions" in dump  # a real dump
        if secret in dump:
            leaks.append(url.rsplit("/", 1)[1])
    assert leaks == []


def test_the_native_stack_sets_what_the_compose_stack_sets(tmp_path: Path) -> None:
    """docker-compose.yml and the native stack give Airflow the same settings by name."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    compose_env = set(compose["x-airflow-common"]["environment"])
    assert compose_env == set(COMPOSE_AIRFLOW_ENV)
    stack = ServiceStack(root=tmp_path, airflow_db_url="postgresql+psycopg2://u@h/airflow",
                         mlflow_backend_uri="postgresql+psycopg2://u@h/mlflow",
                         redis_url="redis://127.0.0.1:6379/0", storage_uri="s3://b/data",
                         s3=S3Settings(endpoint_url="http://127.0.0.1:9000",
                                       region_name="us-east-1", aws_access_key_id="k",
                                       aws_secret_access_key="s"),
                         mlflow_artifacts="s3://b/mlflow", configs_dir=tmp_path,
                         dags_folder=DAGS, plugins_folder=PLUGINS)
    env = stack.airflow_environment()
    assert compose_env <= set(env)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql+psycopg2://u@h/airflow"
    # The compose file names the same drivers (SQLAlchemy 2.1 reads postgresql:// as psycopg 3,
    # which neither image has).
    assert compose["x-airflow-common"]["environment"]["AIRFLOW__CELERY__RESULT_BACKEND"
                                                      ].startswith("db+postgresql+psycopg2://")
    assert "--backend-store-uri postgresql+psycopg2://" in compose["services"]["mlflow"]["command"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AUTORETRAIN_S3_ENDPOINT_URL"]
    # The workers of the compose file serve the queues the native stack's do.
    workers = {name: service for name, service in compose["services"].items()
               if str(service.get("command", "")).startswith("celery worker")}
    queues = {tuple(s["command"].split("--queues ")[1].split()[0].split(","))
              for s in workers.values()}
    assert queues == {w.queues for w in stack.workers}
