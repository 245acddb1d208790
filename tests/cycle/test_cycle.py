"""Cycle settings and the small helpers the stages share.

The whole cycle through ``autoretrain cycle``, on both storage backends, is in
``tests/reliability/test_crashes.py``: killed at every stage and rerun until it finishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain_lib.core.config import parse_object_type_config
from retrain_lib.cycle.champion import version_uri
from retrain_lib.cycle.settings import CycleSettings


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
