"""``autoretrain trace``: the chain from a detection back to the drops, on both storage
backends, with every stored hash checked and every bad starting point named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from retrain_lib.cli.app import app
from retrain_lib.core.config import ObjectTypeConfig, parse_object_type_config
from retrain_lib.core.storage import S3Settings, Storage
from retrain_lib.cycle.data import assemble, ingest, scenes_to_tile, tile_one
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.stages.chip_index import IndexedChip, query_chip_index, read_chip_index
from retrain_lib.stages.registry import ModelRegistry
from tests.conftest import BACKENDS, drop_region, new_bucket, put_folder
from tests.stages.test_registry import training_run

CONFIG: dict[str, Any] = {"name": "vehicle", "classes": ["car", "truck"],
                          "tiling": {"tile_size": 128, "overlap": 0.1}}
CFG: ObjectTypeConfig = parse_object_type_config(CONFIG)


@dataclass
class Traced:
    """A cataloged, tiled and assembled type with one registered version, on one backend."""

    backend: str
    settings: CycleSettings
    env: dict[str, str]
    configs: Path
    dataset: str
    version: str
    parent: str
    chip: IndexedChip
    predictions: Path
    """A detection by ``version``, at the centre of ``chip``, as detect writes it."""
    centre: tuple[float, float]
    """Its centre in the file's CRS."""
    pixel: float
    """The scene's pixel size, in map units."""

    @property
    def storage(self) -> Storage:
        return self.settings.storage()

    def cli(self, *args: str) -> Any:
        return CliRunner().invoke(app, [
            "trace", "vehicle", *args, "--configs", str(self.configs),
            "--storage", self.settings.storage_uri, "--mlflow-uri", self.settings.tracking_uri],
            env=self.env)

    def trace(self, *args: str) -> dict[str, Any]:
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


def _register(registry: ModelRegistry, root: Path, name: str, dataset: str,
              parent: str = "") -> str:
    """A version whose run logged weights and their digest, as a training does."""
    run_id = training_run(registry, root, name)
    registry.client.set_tag(run_id, "weights_sha256", hashlib.sha256(name.encode()).hexdigest())
    return registry.register_candidate(run_id, dataset_version=dataset, cycle_id=f"c-{name}",
                                       candidate="a", parent_version=parent or None)


@pytest.fixture(scope="module", params=BACKENDS)
def traced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Traced]:
    import shapely
    from affine import Affine

    from retrain_lib.geo.crs import WGS84, reproject_geometries

    root = tmp_path_factory.mktemp(f"trace-{request.param}")
    mlflow = f"sqlite:///{root / 'mlflow.db'}"
    env: dict[str, str] = {}
    if request.param == "local":
        settings = CycleSettings(storage_uri=str(root / "storage"), mlflow_uri=mlflow,
                                 scratch=str(root / "scratch"))
    else:
        s3 = S3Settings(endpoint_url=request.getfixturevalue("s3_endpoint"),
                        region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")
        settings = CycleSettings(storage_uri=f"s3://{new_bucket(s3, 'trace')}/root",
                                 mlflow_uri=mlflow, scratch=str(root / "scratch"), s3=s3)
        env = {"AUTORETRAIN_S3_ENDPOINT_URL": s3.endpoint_url or "",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
    configs = root / "configs"
    configs.mkdir()
    (configs / "vehicle.yaml").write_text(yaml.safe_dump(CONFIG))
    storage = settings.storage()
    drop_region(root / "drops" / "arid", "arid", 3, seed=40)
    put_folder(storage, root / "drops" / "arid", "incoming/vehicle/arid-drop")
    ingest(CFG, settings, "c1")
    for scene in scenes_to_tile(CFG, settings):
        tile_one(CFG, settings, scene)
    dataset = assemble(CFG, settings, "c1").version
    registry = ModelRegistry(CFG.registered_model_name, settings.tracking_uri)
    parent = _register(registry, root, "v-parent", dataset)
    version = _register(registry, root, "v-child", dataset, parent=parent)
    with storage.local_copy(f"datasets/vehicle/{dataset}/chips.gpkg", root) as index:
        chip = next(c for c in read_chip_index(index) if c.split == "train")
    manifest = storage.get_json(f"catalog/vehicle/scenes/{chip.scene_id}/manifest.json")
    lonlat = shapely.box(*chip.bounds_lonlat).centroid
    centre = reproject_geometries(lonlat, WGS84, manifest["crs"])
    # A 4 px box around the centre, in the scene's CRS, with detect's properties.
    size = abs(Affine(*manifest["transform"]).a) * 2
    box = shapely.box(centre.x - size, centre.y - size, centre.x + size, centre.y + size)
    predictions = root / "predictions.geojson"
    predictions.write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {
            "name": manifest["crs"]}},
        "features": [{"type": "Feature", "geometry": shapely.geometry.mapping(box),
                      "properties": {"class": "car", "class_id": 0, "score": 0.9,
                                     "model": CFG.registered_model_name,
                                     "model_version": version, "scene_id": chip.scene_id}}]}))
    yield Traced(request.param, settings, env, configs, dataset, version, parent, chip,
                 predictions, (centre.x, centre.y), abs(Affine(*manifest["transform"]).a))


def _links(link: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield link
    for child in link["children"]:
        yield from _links(child)


def _kinds(link: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [x for x in _links(link) if x["kind"] == kind]


def test_a_detection_leads_to_its_model_dataset_chips_scene_and_drop(traced: Traced) -> None:
    chain = traced.trace(str(traced.predictions), "--feature", "0")
    assert chain["kind"] == "detection"
    assert {x["status"] for x in _links(chain)} == {"ok"}, json.dumps(chain, indent=1)
    [model, parent] = _kinds(chain, "model_version")
    assert model["details"]["version"] == traced.version
    assert parent["title"].startswith("warm-started from model version " + traced.parent)
    assert [w["details"]["sha256"] for w in _kinds(chain, "weights")] == [
        hashlib.sha256(b"v-child").hexdigest(), hashlib.sha256(b"v-parent").hexdigest()]
    run = _kinds(model, "training_run")[0]
    assert run["status"] == "ok" and run["details"]["tags"]["weights_sha256"]
    dataset = _kinds(model, "dataset")[0]
    assert dataset["details"]["version"] == traced.dataset
    assert dataset["details"]["chips_per_region"].keys() == {"arid"}
    chips = _kinds(model, "chip")
    # Every chip named covers the detection's place, and the one it was put on is among them.
    assert traced.chip.image_key in {c["details"]["image"] for c in chips}
    lon, lat = chain["details"]["centre_lonlat"]
    for chip in chips:
        west, south, east, north = chip["details"]["bounds_lonlat"]
        assert west <= lon <= east and south <= lat <= north
        assert chip["details"]["label_revision_is_current"] is True
    [scene] = {s["details"]["scene_id"] for s in _kinds(model, "scene")}
    assert scene == traced.chip.scene_id
    [drop] = {d["details"]["drop_id"] for d in _kinds(model, "drop")}
    assert drop == "arid-drop"


def test_the_detection_at_a_point_and_the_tree_for_people(traced: Traced) -> None:
    result = traced.cli(str(traced.predictions), "--at", "{},{}".format(*traced.centre))
    assert result.exit_code == 0, result.output
    assert f"model version {traced.version} of autoretrain-vehicle" in result.stdout
    assert "drop arid-drop" in result.stdout and "BROKEN" not in result.stdout
    assert "link(s):" in result.stderr and "broken" not in result.stderr


def test_a_version_a_dataset_and_a_scene_start_a_trace_too(traced: Traced) -> None:
    by_alias = traced.trace(f"models:/autoretrain-vehicle/{traced.version}", "--ancestors", "0")
    assert by_alias["details"]["version"] == traced.version
    assert "not followed" in _kinds(by_alias, "model_version")[-1]["title"]
    dataset = traced.trace(traced.dataset)
    assert dataset["details"]["trained_versions"] == [traced.parent, traced.version]
    scene = traced.trace(traced.chip.scene_id)
    assert scene["details"]["dataset_versions"] == [traced.dataset]
    assert scene["details"]["model_versions"] == [traced.parent, traced.version]


@pytest.mark.parametrize(("args", "expected"), [
    (["missing.geojson", "--feature", "0"], "missing.geojson: no such file"),
    (["{predictions}", "--feature", "7"], "no feature 7; it holds 1 detection(s)"),
    (["{predictions}", "--at", "0,0"], "the point (0.0, 0.0) is outside scene"),
    (["{predictions}"], "say which detection: --feature N or --at X,Y"),
    (["42"], "has no version 42"),
    (["models:/other-model/1"], "model 'other-model' is not vehicle's model"),
    (["@challenger"], "no version with alias @challenger"),
    (["ds-000000000000"], "no dataset version 'ds-000000000000' of vehicle"),
    (["no-such-scene"], "no scene 'no-such-scene' in the catalog of vehicle"),
    (["{predictions}", "--at", "1;2"], "--at '1;2': expected X,Y"),
    (["some-scene", "--at", "1,2"], "'some-scene' is a scene id"),
])
def test_bad_starting_points_get_one_clear_message(traced: Traced, args: list[str],
                                                   expected: str) -> None:
    result = traced.cli(*[a.format(predictions=traced.predictions) for a in args])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output


def test_the_point_between_detections_names_the_nearest(traced: Traced) -> None:
    x, y = traced.centre
    result = traced.cli(str(traced.predictions), "--at", f"{x + 6 * traced.pixel},{y}")
    assert result.exit_code == 2
    assert "no detection at" in result.stderr and "the nearest is feature 0" in result.stderr


def _tamper(storage: Storage, key: str, change: bytes) -> bytes:
    original = storage.get_bytes(key)
    storage.put_bytes(key, original + change)
    return original


@pytest.mark.parametrize(("what", "broken_kind", "message"), [
    ("scene", "scene", "does not hash to"),
    ("list", "dataset", "the lists were changed after assembly"),
    ("shard", "chip", "changed after the dataset was assembled"),
])
def test_a_tampered_file_is_a_broken_link_named_by_the_trace(traced: Traced, what: str,
                                                             broken_kind: str,
                                                             message: str) -> None:
    storage = traced.storage
    key = {"scene": f"catalog/vehicle/scenes/{traced.chip.scene_id}/scene.tif",
           "list": f"datasets/vehicle/{traced.dataset}/train.txt",
           "shard": f"{traced.chip.shard_prefix}/index.json"}[what]
    original = _tamper(storage, key, b"../extra/images/x.jpg\n" if what == "list" else b" ")
    try:
        result = traced.cli(str(traced.predictions), "--feature", "0", "--ancestors", "0",
                            "--json")
        assert result.exit_code == 1, result.output
        chain = json.loads(result.stdout)
        broken = [x for x in _links(chain) if x["status"] == "broken"]
        assert {x["kind"] for x in broken} == {broken_kind}, broken
        assert all(message in x["problem"] for x in broken)
        assert "broken link(s)" in result.stderr
    finally:
        storage.put_bytes(key, original)


def test_deleted_records_are_gone_with_what_is_still_known(traced: Traced) -> None:
    storage = traced.storage
    prefix = f"datasets/vehicle/{traced.dataset}"
    keys = storage.list(prefix + "/")
    saved = {k: storage.get_bytes(k) for k in keys}
    registry = ModelRegistry(CFG.registered_model_name, traced.settings.tracking_uri)
    registry.client.delete_model_version(CFG.registered_model_name, traced.parent)
    try:
        for key in keys:
            storage.delete(key)
        chain = traced.trace(str(traced.predictions), "--feature", "0")
        gone = {x["kind"]: x["problem"] for x in _links(chain) if x["status"] == "gone"}
        assert set(gone) == {"dataset", "model_version"}, gone
        assert "is not in storage" in gone["dataset"] and "still known" in gone["dataset"]
        assert f"version {traced.parent} is no longer in the registry" in gone["model_version"]
    finally:
        for key, data in saved.items():
            storage.put_bytes(key, data)


def test_the_chip_index_finds_chips_by_place_without_the_tile_indexes(traced: Traced,
                                                                      tmp_path: Path) -> None:
    storage = traced.storage
    with storage.local_copy(f"datasets/vehicle/{traced.dataset}/chips.gpkg", tmp_path) as path:
        chips = read_chip_index(path)
        west, south, east, north = traced.chip.bounds_lonlat
        lon, lat = (west + east) / 2, (south + north) / 2
        covering = query_chip_index(path, lon, lat)
        near = query_chip_index(path, lon, lat, radius_m=500.0)
    card = storage.get_json(f"datasets/vehicle/{traced.dataset}/card.json")
    assert len(chips) == card["train_unique"]["chips"] + card["val"]["chips"]
    assert traced.chip in covering and set(covering) <= set(near) <= set(chips)
    assert all(c.bounds_lonlat[0] <= lon <= c.bounds_lonlat[2] for c in covering)
    assert len(near) > len(covering)
