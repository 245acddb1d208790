"""A whole cycle through ``autoretrain cycle``, killed with SIGKILL at every stage and rerun
with the same cycle id, on both storage backends.

On S3 the cycle runs as the compose stack has it: storage in a bucket of an S3 server over
HTTP (moto's, on 127.0.0.1), and a real MLflow server whose artifacts live in the same server.

Each run is killed at the next point of :data:`CRASH_POINTS` (``tests/reliability/
crash_driver.py`` aims the kill); the rerun that follows must take up what the killed run left.
After the last one, a plain ``autoretrain cycle`` finishes the cycle, and what storage and
MLflow hold must be what one uninterrupted cycle would have left: no duplicate scene, chip
shard, dataset or model version, nothing half-written, nothing an analyst dropped lost, and a
champion whose tags and metrics agree with the report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrain_lib.core.storage import Storage, open_storage
from tests.conftest import (
    REPO_ROOT,
    Backend,
    good_and_bad_drops,
    put_folder,
    storage_backend,
)

CYCLE_CONFIG = {
    "name": "vehicle", "classes": ["car", "truck"],
    "trigger": {"min_new_annotations": 5},
    "tiling": {"tile_size": 128, "overlap": 0.1},
    "training": {"epochs": 1, "imgsz": 64, "batch": 8, "workers": 0,
                 "candidates": [{"name": "a"}]},
    "promotion": {"absolute_floor": 0.0},
}

# (what the killed run was doing, where the kill lands), in the order a cycle reaches them.
CRASH_POINTS = [
    ("trigger checked", "after:retrain_lib.cycle.run:check_new_data"),
    ("quarantining a bad drop, one file removed from incoming/",
     "after:retrain_lib.core.storage:Storage.delete@incoming/vehicle/bad/"),
    ("ingesting, one of three scenes cataloged", "after:retrain_lib.stages.ingest:_catalog_scene"),
    ("ingesting, the cataloged drop half removed from incoming/",
     "after:retrain_lib.core.storage:Storage.delete@incoming/vehicle/region-a/s0.tif"),
    ("tiling, one of three scenes tiled", "after:retrain_lib.cycle.run:tile_one"),
    ("mining done", "after:retrain_lib.cycle.run:mine"),
    ("dataset assembled", "after:retrain_lib.cycle.run:assemble"),
    ("training, mid-run", "line:retrain_lib.training.runners.local:stream_lines"
                          "@Starting training for"),
    ("training done", "after:retrain_lib.cycle.run:train_candidate"),
    ("evaluation done", "after:retrain_lib.cycle.run:evaluate_models"),
    ("registering, the version created but not yet tagged",
     "after:mlflow.tracking.client:MlflowClient.create_model_version"),
    ("promoting, the decision tagged but the alias not yet moved",
     "before:mlflow.tracking.client:MlflowClient.set_registered_model_alias"),
    ("promoting, the alias moved but the alias change not yet recorded",
     "after:mlflow.tracking.client:MlflowClient.set_registered_model_alias"),
    ("writing the report", "before:retrain_lib.cycle.run:write_report"),
]




# On S3 the chain skips the points after stages that write nothing (the check, a mining with
# no champion yet, the evaluation, whose scores only reach the report): there the rerun finds
# exactly what the previous point left, and each point costs a whole process start (MLflow's
# import alone takes ~10 s on a 2-core machine).
WRITE_FREE_POINTS = {"trigger checked", "mining done", "evaluation done"}
S3_CRASH_POINTS = [(stage, point) for stage, point in CRASH_POINTS
                   if stage not in WRITE_FREE_POINTS]

# On S3, after the run killed at these points, a service is down for one run: the run must
# fail with one clear message and leave what the next run can take up.
OUTAGES = {"tiling, one of three scenes tiled": "s3", "dataset assembled": "mlflow"}


def _cycle(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False)


# One class per backend: `make test`'s workers (--dist loadscope) may run them side by side.
@pytest.mark.slow
class TestLocalStorage:
    def test_a_cycle_killed_at_every_stage_and_rerun_ends_as_one_clean_cycle(
            self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        crash_chain("local", tmp_path, request)


@pytest.mark.slow
class TestS3:
    def test_a_cycle_killed_at_every_stage_and_rerun_ends_as_one_clean_cycle(
            self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        crash_chain("s3", tmp_path, request)


def crash_chain(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Kill ``autoretrain cycle`` at every point in turn, rerun, finish, check one clean cycle."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(CYCLE_CONFIG))
    drops = tmp_path / "drops"
    good_and_bad_drops(drops)
    with storage_backend(backend_name, tmp_path, request, outages=True) as backend:
        storage = backend.storage()
        for drop in ("region-a", "bad"):
            put_folder(storage, drops / drop, f"incoming/vehicle/{drop}")
        mlflow_uri = backend.mlflow_uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update({**backend.environment(), "MLFLOW_TRACKING_URI": mlflow_uri,
                    "AUTORETRAIN_SCRATCH": str(tmp_path / "scratch"),
                    "PYTHONPATH": str(REPO_ROOT)})
        arguments = ["cycle", "vehicle", "--configs", str(configs), "--cycle-id", "c1"]
        for stage, point in (S3_CRASH_POINTS if backend_name == "s3" else CRASH_POINTS):
            proc = _cycle([sys.executable, "-m", "tests.reliability.crash_driver", point, "--",
                           *arguments], env, tmp_path)
            output = proc.stdout + proc.stderr
            assert proc.returncode == -signal.SIGKILL, (
                f"the run to be killed at '{stage}' ended with exit code {proc.returncode} "
                f"instead:\n{output[-4000:]}")
            assert "Traceback" not in output, output[-4000:]
            if backend_name == "s3" and stage in OUTAGES:
                _run_during_outage(OUTAGES[stage], backend, arguments, env, tmp_path)

        proc = _cycle([str(Path(sys.executable).with_name("autoretrain")), *arguments],
                      env, tmp_path)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
        assert "cycle c1: promoted" in output
        _check_one_clean_cycle(storage, mlflow_uri, drops)
        if backend.mlflow_artifacts:
            # The registered model's files are in S3, where the MLflow server keeps artifacts,
            # and nothing was written beside the server instead.
            artifacts = open_storage(backend.mlflow_artifacts, s3=backend.s3).list()
            assert any(key.endswith("best.pt") for key in artifacts), artifacts
            assert not (tmp_path / "mlflow-server" / "artifacts").exists()


def _run_during_outage(service: str, backend: Backend, arguments: list[str],
                       env: dict[str, str], cwd: Path) -> None:
    """One ``autoretrain cycle`` while ``service`` (``s3`` or ``mlflow``) is stopped; it is
    started again afterwards, with its data, as a restarted service would be."""
    down = backend.s3_proxy if service == "s3" else backend.mlflow
    assert down is not None
    # MLflow's client retries for minutes by default; the failure is the same, sooner.
    quick = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    down.stop()
    try:
        proc = _cycle([str(Path(sys.executable).with_name("autoretrain")), *arguments],
                      quick, cwd)
    finally:
        down.start()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-4000:]
    named = backend.storage_uri.split("/")[2] if service == "s3" else backend.mlflow_uri
    assert named and named in errors[0], errors


def _check_one_clean_cycle(storage: Storage, mlflow_uri: str, drops: Path) -> None:
    from mlflow.tracking import MlflowClient

    from retrain_lib.stages.registry import ModelRegistry

    keys = storage.list()
    # Nothing half-written: every JSON document parses, no scratch or in-progress file is left.
    for key in keys:
        if key.endswith(".json"):
            storage.get_json(key)
    leftovers = [k for k in keys if "/.old-" in k or "/.tmp" in k or "in-progress" in k]
    assert not leftovers, leftovers
    # Each killed run left the cycle's lock; each rerun of the cycle took it up, and the last
    # gave it back.
    from retrain_lib.cycle.lock import lock_state

    lock = lock_state(storage, "vehicle")
    assert lock is not None and lock.released, lock

    # Every byte dropped is under the root, once: the good drop in the catalog, the bad one
    # in quarantine with the reason of what is wrong with it, incoming/ empty.
    assert not [k for k in keys if k.startswith("incoming/")], keys
    scenes = sorted({k.split("/")[3] for k in keys if k.startswith("catalog/vehicle/scenes/")})
    assert scenes == ["region-a-s0", "region-a-s1", "region-a-s2"], scenes
    for n, scene in enumerate(scenes):
        cataloged = storage.get_bytes(f"catalog/vehicle/scenes/{scene}/scene.tif")
        assert cataloged == (drops / "region-a" / f"s{n}.tif").read_bytes()
    quarantined = sorted({k.split("/")[2] for k in keys if k.startswith("quarantine/")})
    assert quarantined == ["bad"], quarantined
    for name in ("drop.json", "s0.tif", "s0.geojson"):
        assert storage.get_bytes(f"quarantine/vehicle/bad/{name}") == \
            (drops / "bad" / name).read_bytes()
        manifest = storage.get_json(f"catalog/vehicle/scenes/{scene}/manifest.json")
        assert manifest["region"] == "vegetated", manifest  # from the drop's drop.json
    # The reason is the one the first run found, not what a rerun made of the rest.
    reason = storage.get_json("quarantine/vehicle/bad/reason.json")
    assert sorted(reason["files"]) == ["drop.json", "s0.geojson", "s0.tif"], reason
    assert reason["metadata"]["region"] == "vegetated", reason
    assert ["boat" in p["problem"] for p in reason["problems"]] == [True], reason

    # One chip shard per scene, one dataset version, one model version.
    shards = sorted(k.split("/")[3] for k in keys
                    if k.startswith("chips/vehicle/") and k.endswith("/index.json"))
    assert shards == scenes, shards
    datasets = sorted({k.split("/")[2] for k in keys if k.startswith("datasets/vehicle/")
                       and k.count("/") > 2})
    report: dict[str, Any] = storage.get_json("cycles/vehicle/c1/report.json")
    assert datasets == [report["dataset"]["version"]], datasets
    assert report["status"] == "promoted" and report["ingest"]["cataloged"] == 1, report
    assert report["promotion"]["promoted_version"] == "1", report["promotion"]
    [trained] = report["trained"]
    models = storage.url("models/vehicle/_")[:-1]
    assert trained["weights_uri"].startswith(models)
    assert storage.exists("models/vehicle/" + trained["weights_uri"][len(models):])
    assert set(report["evaluation"]["candidates"]["a"]["regions"]) == {"vegetated"}

    registry = ModelRegistry("autoretrain-vehicle", mlflow_uri)
    versions = registry.list_versions()
    assert [v.version for v in versions] == ["1"], versions
    champion = registry.champion()
    assert champion is not None and champion.version == "1"
    # The champion's tags say what the report says: the decision and the frozen-test metrics.
    tags = champion.tags
    assert tags["decision"] == "promoted" and tags["cycle_id"] == "c1", tags
    metrics = report["evaluation"]["candidates"]["a"]
    assert "map50_95" in champion.metrics, tags
    for name, value in champion.metrics.items():
        assert value == pytest.approx(metrics[name]), (name, tags, metrics)
    assert tags["dataset_version"] == report["dataset"]["version"]
    # The killed runs' MLflow runs are closed, not left "running" for ever.
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], \
        [(r.info.run_id, r.info.status) for r in runs]
