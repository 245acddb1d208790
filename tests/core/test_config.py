"""Object-type configs: the shipped ones are valid, and every kind of mistake gets one message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrain_lib.core.config import (
    ObjectTypeConfig,
    load_object_type_config,
    load_object_type_configs,
    parse_object_type_config,
)
from retrain_lib.core.errors import ConfigError
from tests.conftest import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs" / "object_types"


def write(tmp_path: Path, data: object, name: str = "vehicle") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def minimal(**extra: object) -> dict:
    return {"name": "vehicle", "classes": ["car", "truck"], **extra}


def test_shipped_configs_are_valid() -> None:
    configs = load_object_type_configs(CONFIG_DIR)
    assert {"vehicle", "aircraft"} <= set(configs)
    vehicle = configs["vehicle"]
    assert vehicle.classes == ["car", "truck"]
    assert vehicle.registered_model_name == "autoretrain-vehicle"
    assert configs["aircraft"].tiling.tile_size_m == 200


def test_defaults_fill_a_minimal_config(tmp_path: Path) -> None:
    cfg = load_object_type_config(write(tmp_path, minimal()))
    assert cfg.schema_version == 1
    assert cfg.tiling.tile_size_px_default == 640
    assert [c.name for c in cfg.training.candidates] == ["default"]
    assert cfg.runner.kind == "local"
    assert cfg.schedule == "@weekly"


def test_unknown_key_is_an_error_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(tiling={"tile_sise": 512}))
    with pytest.raises(ConfigError) as info:
        load_object_type_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "tiling.tile_sise: unknown key" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clases: unknown key"):
        load_object_type_config(write(tmp_path, minimal(clases=["x"])))


def test_wrong_type_names_field_value_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(training={"epochs": "many"}))
    with pytest.raises(ConfigError) as info:
        load_object_type_config(path)
    message = str(info.value)
    assert "training.epochs: got 'many'" in message
    assert "integer" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tiling.min_visibility: got 1.5; .*less than or equal"):
        load_object_type_config(write(tmp_path, minimal(tiling={"min_visibility": 1.5})))


@pytest.mark.parametrize("schedule", ["61 * * * *", "every day", "* * *", "@fortnightly"])
def test_bad_cron_is_rejected(tmp_path: Path, schedule: str) -> None:
    with pytest.raises(ConfigError, match=r"schedule: got"):
        load_object_type_config(write(tmp_path, minimal(schedule=schedule)))


@pytest.mark.parametrize("schedule", ["@daily", "@weekly", "0 3 * * 1", "*/15 2-4 * * mon-fri"])
def test_good_schedules(tmp_path: Path, schedule: str) -> None:
    assert load_object_type_config(write(tmp_path, minimal(schedule=schedule))).schedule == schedule


def test_manual_only_schedule(tmp_path: Path) -> None:
    assert load_object_type_config(write(tmp_path, minimal(schedule=None))).schedule is None


def test_empty_classes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"classes: got \[\]; .*at least 1"):
        load_object_type_config(write(tmp_path, {"name": "vehicle", "classes": []}))


def test_duplicate_classes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeated: car"):
        load_object_type_config(write(tmp_path, {"name": "vehicle", "classes": ["car", "Car"]}))


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classes: required field is missing"):
        load_object_type_config(write(tmp_path, {"name": "vehicle"}))


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(schedule="bad", training={"epochs": 0}, extra=1))
    with pytest.raises(ConfigError) as info:
        load_object_type_config(path)
    message = str(info.value)
    assert "3 problems" in message
    for field in ("schedule", "training.epochs", "extra"):
        assert field in message


def test_name_must_match_file_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must equal the file name 'ships'"):
        load_object_type_config(write(tmp_path, minimal(), name="ships"))


def test_invalid_yaml_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_object_type_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="file is empty"):
        load_object_type_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_object_type_config(write(tmp_path, "- a\n- b\n"))


def test_candidate_overrides_are_checked(tmp_path: Path) -> None:
    data = minimal(training={"candidates": [{"name": "a", "overrides": {"lr_0": 0.1}}]})
    with pytest.raises(ConfigError, match=r"unknown training argument\(s\) lr_0"):
        load_object_type_config(write(tmp_path, data))
    data = minimal(training={"candidates": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="repeated: a"):
        load_object_type_config(write(tmp_path, data))


def test_tile_size_in_pixels_or_metres_not_both(tmp_path: Path) -> None:
    data = minimal(tiling={"tile_size": 512, "tile_size_m": 100})
    with pytest.raises(ConfigError, match="not both"):
        load_object_type_config(write(tmp_path, data))


def test_class_aliases_normalise_and_must_target_known_classes(tmp_path: Path) -> None:
    cfg = parse_object_type_config(minimal(class_aliases={"Lorry": "truck"}))
    assert cfg.normalise_class(" CAR ") == "car"
    assert cfg.normalise_class("lorry") == "truck"
    assert cfg.normalise_class("boat") is None
    assert cfg.class_mapper.index("truck") == 1 and cfg.class_mapper.index("Lorry") == 1
    with pytest.raises(ConfigError, match="unknown class"):
        parse_object_type_config(minimal(class_aliases={"boat": "ship"}))


def test_assignment_is_validated() -> None:
    cfg = ObjectTypeConfig(name="vehicle", classes=["car"])
    with pytest.raises(ValueError):
        cfg.training.epochs = -1


def test_unsupported_schema_version(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schema_version: got 2"):
        load_object_type_config(write(tmp_path, minimal(schema_version=2)))


def test_directory_loading_reports_every_bad_file(tmp_path: Path) -> None:
    write(tmp_path, minimal())
    write(tmp_path, {"name": "ships", "classes": []}, name="ships")
    write(tmp_path, {"name": "boats", "classes": ["b"], "x": 1}, name="boats")
    with pytest.raises(ConfigError) as info:
        load_object_type_configs(tmp_path)
    assert "ships.yaml" in str(info.value) and "boats.yaml" in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "retrain_lib.cli", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_cli_validate_ok_and_errors(tmp_path: Path) -> None:
    ok = run_cli("config", "validate", str(CONFIG_DIR))
    assert ok.returncode == 0, ok.stderr
    assert "config(s) valid" in ok.stdout

    bad = write(tmp_path, minimal(tiling={"tile_sise": 512}))
    result = run_cli("config", "validate", str(bad))
    assert result.returncode == 2
    assert "tiling.tile_sise: unknown key" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout

    usage = run_cli("config", "validate")
    assert usage.returncode == 2


def test_cli_help_works_everywhere() -> None:
    for args in (["--help"], ["config", "--help"], ["config", "validate", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout


def test_configuration_reference_is_in_sync() -> None:
    from retrain_lib.core.config_docs import config_reference_markdown

    committed = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference_markdown() + "\n", (
        "docs/configuration.md is stale: run `autoretrain config docs --out "
        "docs/configuration.md`")
