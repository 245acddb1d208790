"""The detect stage without Airflow: listing, idempotent moves, and refusing foreign keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain_lib.core.config import parse_object_type_config
from retrain_lib.core.errors import InputError
from retrain_lib.core.layout import (
    inference_done_prefix,
    inference_incoming_prefix,
    predictions_key,
)
from retrain_lib.cycle.detect import ServingModel, detect_incoming_scene, list_inference_scenes
from retrain_lib.cycle.settings import CycleSettings

CFG = parse_object_type_config({"name": "vehicle", "classes": ["car", "truck"]})
MODEL = ServingModel(model_name="autoretrain-vehicle", version="4",
                     model_uri="models:/autoretrain-vehicle/4")


def _settings(tmp_path: Path) -> CycleSettings:
    return CycleSettings(storage_uri=str(tmp_path / "storage"), scratch=str(tmp_path / "tmp"))


def test_only_geotiffs_wait_for_detection(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = settings.storage()
    incoming = inference_incoming_prefix("vehicle")
    for name in ("a.tif", "area/b.TIFF", "notes.txt", "a.geojson"):
        storage.put_bytes(f"{incoming}/{name}", b"x")
    assert list_inference_scenes(CFG, settings) == [f"{incoming}/a.tif",
                                                    f"{incoming}/area/b.TIFF"]


def test_stored_predictions_are_reused_and_the_scene_moved(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = settings.storage()
    key = f"{inference_incoming_prefix('vehicle')}/area 1/scene.tif"
    storage.put_bytes(key, b"pixels")
    # A crash after the predictions were stored but before the move: the retry only moves.
    storage.put_bytes(predictions_key("vehicle", "4", "area-1-scene"), b"{}")
    result = detect_incoming_scene(CFG, settings, key, MODEL)
    assert result.scene_id == "area-1-scene" and result.reused is True
    assert not storage.exists(key)
    done = f"{inference_done_prefix('vehicle')}/area 1/scene.tif"
    assert storage.get_bytes(done) == b"pixels"
    # A second retry finds nothing left to do, and loses nothing.
    again = detect_incoming_scene(CFG, settings, key, MODEL)
    assert again.reused is True and storage.get_bytes(done) == b"pixels"


def test_keys_outside_the_incoming_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not under inference/incoming/vehicle/"):
        detect_incoming_scene(CFG, _settings(tmp_path), "catalog/vehicle/scenes/x/scene.tif",
                              MODEL)
