"""Hard-example mining: known mistakes give exactly the expected hard chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.devtools.synthetic import SceneSpec, SyntheticScene, make_drop
from retrain_lib.geo.geojson import Feature, write_geojson
from retrain_lib.stages.mining import SceneToMine, mine_hard_examples, mine_scene

CFG = ObjectTypeConfig.model_validate({
    "name": "vehicle", "classes": ["car", "truck"],
    "tiling": {"tile_size": 128, "overlap": 0.25},
    "mining": {"dedup_radius_m": 5.0, "conf_threshold": 0.3},
})


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> SyntheticScene:
    folder = tmp_path_factory.mktemp("mine")
    return make_drop(folder, [SceneSpec(scene_id="s", width=512, height=512,
                                        objects_per_class=4, decoys=4, seed=3)])[0]


def write_predictions(path: Path, scene: SyntheticScene, items: list[tuple[object, str, float]]
                      ) -> Path:
    """Predictions as axis-aligned boxes around given polygons (map coordinates)."""
    import shapely

    features = [Feature(shapely.envelope(poly), {"class": cls, "score": score}, index=i)
                for i, (poly, cls, score) in enumerate(items)]
    write_geojson(path, features, scene.crs)
    return path


def test_known_false_positives_and_negatives_give_exactly_those_chips(
        scene: SyntheticScene, tmp_path: Path) -> None:
    truth = list(scene.annotations)
    decoys = [o for o in scene.objects if o.is_decoy]
    found, missed = truth[:-2], truth[-2:]
    items = [(o.polygon_map, o.class_name, 0.9) for o in found]
    items += [(decoys[0].polygon_map, "car", 0.8), (decoys[1].polygon_map, "truck", 0.5),
              (decoys[2].polygon_map, "car", 0.1)]  # below conf_threshold: ignored
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)

    result = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "hard",
                        model_version="3", workers=1)
    assert result.counts == {"false_positive": 2, "false_negative": 2}
    assert result.candidates == {"false_positive": 2, "false_negative": 2}
    fps = [e for e in result.examples if e.reason == "false_positive"]
    fns = [e for e in result.examples if e.reason == "false_negative"]
    assert [e.score for e in fps] == [0.8, 0.5]  # highest confidence first
    assert all(e.score is None and e.model_version == "3" for e in fns)
    missed_areas = sorted((o.polygon_px.envelope.area for o in missed), reverse=True)
    assert [round(e.area_px) for e in fns] == [round(a) for a in missed_areas]

    # Each chip is centred on its mistake (unless clamped at the scene edge).
    for example in result.examples:
        col, row, w, h = example.window
        assert (w, h) == (128, 128)
        cx = (example.box_px[0] + example.box_px[2]) / 2
        cy = (example.box_px[1] + example.box_px[3]) / 2
        assert col <= cx <= col + w and row <= cy <= row + h
        if 64 <= cx <= 512 - 64:
            assert abs(col + w / 2 - cx) <= 1

    # One shard in the tiler's format, each tile carrying its provenance.
    (shard,) = result.shard_dirs
    index = json.loads((shard / "index.json").read_text())
    written = [t for t in index["tiles"] if t["status"] == "written"]
    assert sorted(t["reason"] for t in written) == ["false_negative", "false_negative",
                                                    "false_positive", "false_positive"]
    for tile in written:
        assert tile["model_version"] == "3" and len(tile["center_lonlat"]) == 2
        labels = (shard / tile["label"]).read_text().splitlines()
        if tile["reason"] == "false_negative":
            assert labels, "a hard-positive chip labels the missed object"
        assert sum(tile["objects"].values()) == len(labels)


def test_a_scene_on_s3_is_mined_in_place_as_the_local_file_is(
        scene: SyntheticScene, tmp_path: Path, s3_bucket: str, s3_endpoint: str) -> None:
    """Mining reads only the windows of the mistakes, from S3 in place (/vsis3/)."""
    from retrain_lib.core.storage import S3Settings, open_storage
    from retrain_lib.geo.raster import object_storage

    truth = list(scene.annotations)
    decoys = [o for o in scene.objects if o.is_decoy]
    items = [(o.polygon_map, o.class_name, 0.9) for o in truth[:-1]]
    items.append((decoys[0].polygon_map, "car", 0.8))
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    settings = S3Settings.from_env()
    storage = open_storage(f"s3://{s3_bucket}/root", s3=settings)
    storage.put_file(scene.path, "catalog/s/scene.tif")
    here = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "local",
                      model_version="3", workers=1)
    with object_storage(settings):
        there = mine_scene(Path(storage.raster_path("catalog/s/scene.tif")),
                           scene.annotations_path, preds, CFG, tmp_path / "s3",
                           model_version="3", workers=1)
    assert there.counts == here.counts == {"false_positive": 1, "false_negative": 1}
    (local_shard,), (s3_shard,) = here.shard_dirs, there.shard_dirs
    assert sorted(p.read_bytes() for p in (s3_shard / "images").iterdir()) == sorted(
        p.read_bytes() for p in (local_shard / "images").iterdir())


def test_true_objects_inside_a_hard_negative_chip_stay_labelled(scene: SyntheticScene,
                                                                tmp_path: Path) -> None:
    truth = list(scene.annotations)
    # A false positive right next to a real car: its chip must label that car.
    neighbour = truth[0].polygon_map
    fake = neighbour.buffer(0).envelope
    import shapely

    fake = shapely.affinity.translate(fake, xoff=8.0)
    items = [(o.polygon_map, o.class_name, 0.9) for o in truth] + [(fake, "truck", 0.95)]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    result = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "hard",
                        model_version="1", workers=1)
    assert result.counts == {"false_positive": 1, "false_negative": 0}
    index = json.loads((result.shard_dirs[0] / "index.json").read_text())
    (tile,) = [t for t in index["tiles"] if t["status"] == "written"]
    assert tile["objects"].get(truth[0].class_name, 0) >= 1


def test_nothing_to_mine_writes_nothing(scene: SyntheticScene, tmp_path: Path) -> None:
    items = [(o.polygon_map, o.class_name, 0.9) for o in scene.annotations]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    result = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "hard",
                        model_version="1", workers=1)
    assert result.examples == () and result.shard_dirs == ()


def test_deduplication_against_earlier_cycles_and_the_cycle_cap(scene: SyntheticScene,
                                                                 tmp_path: Path) -> None:
    decoys = [o for o in scene.objects if o.is_decoy]
    items = [(o.polygon_map, o.class_name, 0.9) for o in scene.annotations]
    items += [(d.polygon_map, "car", 0.9 - i * 0.1) for i, d in enumerate(decoys)]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    item = SceneToMine(scene.path, scene.annotations_path, preds, "s")

    first = mine_hard_examples([item], CFG, tmp_path / "c1", model_version="1", cycle_id="c1",
                               workers=1)
    assert first.counts["false_positive"] == len(decoys)
    manifest = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert manifest["cycle_id"] == "c1" and len(manifest["examples"]) == len(decoys)

    # Next cycle, same mistakes: all are duplicates of cycle 1 by location.
    previous = [tuple(e["center_lonlat"]) for e in manifest["examples"]]
    second = mine_hard_examples([item], CFG, tmp_path / "c2", model_version="2",
                                cycle_id="c2", previous_lonlat=previous, workers=1)
    assert second.examples == () and second.duplicates == len(decoys)

    capped_cfg = CFG.model_copy(deep=True)
    capped_cfg.mining.max_per_cycle = 2
    third = mine_hard_examples([item], capped_cfg, tmp_path / "c3", model_version="1",
                               cycle_id="c3", workers=1)
    assert len(third.examples) == 2 and third.capped == len(decoys) - 2
    assert [e.score for e in third.examples] == [0.9, 0.8]


def test_unknown_prediction_class_is_a_clear_error(scene: SyntheticScene,
                                                   tmp_path: Path) -> None:
    from retrain_lib.core.errors import InputError

    items = [(scene.annotations[0].polygon_map, "tank", 0.9)]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    with pytest.raises(InputError, match=r"pred.geojson: feature 0 has class 'tank'"):
        mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "hard",
                   model_version="1")


def test_select_is_deterministic(scene: SyntheticScene, tmp_path: Path) -> None:
    decoys = [o for o in scene.objects if o.is_decoy]
    items = [(d.polygon_map, "car", 0.7) for d in decoys]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    a = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "a",
                   model_version="1", workers=1)
    b = mine_scene(scene.path, scene.annotations_path, preds, CFG, tmp_path / "b",
                   model_version="1", workers=1)
    assert [e.to_json() for e in a.examples] == [e.to_json() for e in b.examples]
    assert np.all([e.reason for e in a.examples])


def test_cli_mine_prints_counts_by_reason(scene: SyntheticScene, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retrain_lib.cli import app

    decoy = next(o for o in scene.objects if o.is_decoy)
    # Miss the object farthest from the decoy, so the two chips are far apart.
    missed = max(scene.annotations, key=lambda o: o.polygon_map.distance(decoy.polygon_map))
    items = [(o.polygon_map, o.class_name, 0.9) for o in scene.annotations if o is not missed]
    items += [(decoy.polygon_map, "car", 0.9)]
    preds = write_predictions(tmp_path / "pred.geojson", scene, items)
    config = tmp_path / "vehicle.yaml"
    config.write_text("name: vehicle\nclasses: [car, truck]\ntiling: {tile_size: 128}\n")
    result = CliRunner().invoke(app, [
        "mine", "--scene", str(scene.path), "--truth", str(scene.annotations_path),
        "--pred", str(preds), "--config", str(config), "--out", str(tmp_path / "out"),
        "--model-version", "7"])
    assert result.exit_code == 0, result.output
    assert "false_positive" in result.output and "false_negative" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"false_positive": 1, "false_negative": 1}
    assert manifest["model_version"] == "7"
    both = CliRunner().invoke(app, [
        "mine", "--scene", str(scene.path), "--truth", str(scene.annotations_path),
        "--out", str(tmp_path / "o2"), "--classes", "car"])
    assert both.exit_code == 2 and "exactly one of --pred" in both.output
