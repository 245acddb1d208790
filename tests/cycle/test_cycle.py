"""A whole cycle through ``autoretrain cycle`` on both storage backends; cycle settings and
the small helpers the stages share.

On S3 the cycle runs as the compose stack has it: storage in a bucket of an S3 server over
HTTP (moto's, on 127.0.0.1), and a real MLflow server whose artifacts live in the same server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrain_lib.core.config import parse_object_type_config
from retrain_lib.core.storage import open_storage
from retrain_lib.cycle.champion import version_uri
from retrain_lib.cycle.settings import CycleSettings
from tests.conftest import BACKENDS, drop_region, put_folder, storage_backend

CYCLE_CONFIG = {
    "name": "vehicle", "classes": ["car", "truck"],
    "trigger": {"min_new_annotations": 5},
    "tiling": {"tile_size": 128, "overlap": 0.1},
    "training": {"epochs": 1, "imgsz": 64, "batch": 8, "workers": 0,
                 "candidates": [{"name": "a"}]},
    "promotion": {"absolute_floor": 0.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_whole_cycle_from_the_command_line(backend_name: str, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(CYCLE_CONFIG))
    drop_region(tmp_path / "drops" / "region-a", "vegetated", 3, seed=10)
    with storage_backend(backend_name, tmp_path, request) as backend:
        storage = backend.storage()
        put_folder(storage, tmp_path / "drops" / "region-a", "incoming/vehicle/region-a")
        mlflow_uri = backend.mlflow_uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update({**backend.environment(), "MLFLOW_TRACKING_URI": mlflow_uri,
                    "AUTORETRAIN_SCRATCH": str(tmp_path / "scratch")})
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("autoretrain")), "cycle", "vehicle",
             "--configs", str(configs), "--cycle-id", "c1"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
        assert "cycle c1: promoted" in output

        report = storage.get_json("cycles/vehicle/c1/report.json")
        assert report["status"] == "promoted" and report["ingest"]["cataloged"] == 1
        [trained] = report["trained"]
        # Weights are addressed through the storage layer: a path or an s3:// URI in it.
        models = storage.url("models/vehicle/_")[:-1]
        assert trained["weights_uri"].startswith(models)
        assert storage.exists("models/vehicle/" + trained["weights_uri"][len(models):])
        assert report["promotion"]["promoted_version"] == "1"
        assert set(report["evaluation"]["candidates"]["a"]["regions"]) == {"vegetated"}
        from retrain_lib.stages.registry import ModelRegistry

        champion = ModelRegistry("autoretrain-vehicle", mlflow_uri).champion()
        assert champion is not None and champion.version == "1"
        if backend.mlflow_artifacts:
            # The registered model's files are in S3, where the MLflow server keeps artifacts,
            # and nothing was written beside the server instead.
            artifacts = open_storage(backend.mlflow_artifacts, s3=backend.s3).list()
            assert any(key.endswith("best.pt") for key in artifacts), artifacts
            assert not (tmp_path / "mlflow-server" / "artifacts").exists()


def test_scratch_is_absolute_even_when_given_relative(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Ultralytics resolves a relative dataset path against its own folders, so a relative
    # scratch root broke training; every scratch folder is absolute now.
    monkeypatch.chdir(tmp_path)
    folder = CycleSettings(scratch="rel/scratch").scratch_dir("train x")
    assert folder.is_absolute() and folder == tmp_path / "rel/scratch/autoretrain/train_x"
    monkeypatch.setenv("AUTORETRAIN_SCRATCH", "env-scratch")
    assert CycleSettings().scratch_dir("a") == tmp_path / "env-scratch/autoretrain/a"


def test_version_uri_pins_a_version() -> None:
    cfg = parse_object_type_config({"name": "ship", "classes": ["ship"]})
    assert version_uri(cfg, "7") == "models:/autoretrain-ship/7"
