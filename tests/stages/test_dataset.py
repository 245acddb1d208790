"""Dataset versions: scene-level frozen test set, balancing, stable content-hash ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.storage import LocalStorage, Storage, open_storage
from retrain_lib.devtools.synthetic import SceneSpec, make_drop
from retrain_lib.stages.dataset import assemble_dataset, assign_scene_splits, load_scene_splits
from retrain_lib.stages.tiling import tile_scene

CFG = ObjectTypeConfig.model_validate({
    "name": "vehicle", "classes": ["car", "truck"],
    "tiling": {"tile_size": 128, "overlap": 0.2, "background_ratio": 0.2},
    "dataset": {"test_scene_fraction": 0.25, "val_fraction": 0.34},
    "mining": {"oversample": 3},
})
Shards = tuple[Path, dict[str, str]]
REGIONS = {f"a{i}": "vegetated" for i in range(4)} | {f"b{i}": "arid" for i in range(2)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """Six tiled scenes in a local storage root: scene_id -> shard prefix."""
    root = tmp_path_factory.mktemp("store")
    src = tmp_path_factory.mktemp("src")
    out: dict[str, str] = {}
    for i, (scene_id, region) in enumerate(sorted(REGIONS.items())):
        (scene,) = make_drop(src / scene_id, [SceneSpec(
            scene_id=scene_id, width=256, height=256, objects_per_class=3, decoys=0,
            region=region, seed=i)])  # type: ignore[arg-type]
        result = tile_scene(scene.path, scene.annotations_path, CFG.classes,
                            root / "chips" / "vehicle", CFG.tiling, workers=1)
        out[scene_id] = f"chips/vehicle/{result.params_hash}/{scene_id}"
    return root, out


def fresh_storage(tmp_path: Path, shards: Shards) -> LocalStorage:
    import shutil

    root, _ = shards
    shutil.copytree(root, tmp_path / "root")
    return LocalStorage(tmp_path / "root")


def lines(storage: Storage, key: str) -> list[str]:
    return storage.get_bytes(key).decode().splitlines()


def test_no_test_scene_tile_reaches_train_or_val(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    version = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS,
                               cycle_id="c1")
    splits = load_scene_splits(storage, "vehicle")
    test = {s for s, a in splits.items() if a.split == "test"}
    assert test and set(version.test_scenes) == test
    # At least one test scene per region, since each region brought two or more scenes.
    assert {splits[s].region for s in test} == {"vegetated", "arid"}
    for name in ("train.txt", "val.txt"):
        for line in lines(storage, f"{version.prefix}/{name}"):
            assert not any(f"/{s}/images/" in line for s in test), line
    # Paths are relative to the dataset folder and resolve to real chips and labels.
    first = lines(storage, f"{version.prefix}/train.txt")[0]
    image = (storage.path(version.prefix) / first).resolve()
    assert image.is_file()
    assert Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt").is_file()


def test_version_id_is_stable_and_reused(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    first = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    again = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    assert again.version == first.version and again.reused and not first.reused
    other = fresh_storage(tmp_path / "other", shards)
    elsewhere = assemble_dataset(other, CFG, scene_shards=shards[1], regions=REGIONS)
    assert elsewhere.version == first.version
    assert first.version.startswith("ds-") and len(first.version) == 15


def test_splits_are_frozen_as_scenes_arrive(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    early = {s: REGIONS[s] for s in ("a0", "a1", "a2")}
    before = assign_scene_splits(storage, CFG, early, cycle_id="c1")
    after = assign_scene_splits(storage, CFG, REGIONS, cycle_id="c2")
    for scene_id, split in before.items():
        assert after[scene_id] == split
    assert {after[s].assigned_cycle for s in ("b0", "b1")} == {"c2"}


def test_hard_chips_are_oversampled_and_test_and_val_hard_chips_dropped(
        tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    base = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    splits = load_scene_splits(storage, "vehicle")
    train_scene = next(s for s, a in sorted(splits.items()) if a.split == "train")
    test_scene = next(s for s, a in sorted(splits.items()) if a.split == "test")
    val_scene = next(s for s, a in sorted(splits.items()) if a.split == "val")
    # Reuse regular shards as 'hard' shards: from a train, a test and a validation scene.
    hard = [shards[1][train_scene], shards[1][test_scene], shards[1][val_scene]]
    with_hard = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS,
                                 hard_shards=hard)
    assert with_hard.version != base.version
    hard_chips = with_hard.card["train_unique"]["hard_chips"]
    n_train_scene_chips = len(lines(storage, f"{base.prefix}/train.txt"))
    assert hard_chips > 0
    assert with_hard.card["train"]["hard_chips"] == 3 * hard_chips
    assert with_hard.train_images < n_train_scene_chips + 3 * hard_chips + 1_000
    train_lines = lines(storage, f"{with_hard.prefix}/train.txt")
    assert not any(f"/{test_scene}/images/" in line for line in train_lines)
    # The validation scene's own chips validate; none of them trains, hard or not.
    assert not any(f"/{val_scene}/images/" in line for line in train_lines)


def test_card_and_data_yaml(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    version = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS,
                               cycle_id="c7")
    data = yaml.safe_load(storage.get_bytes(version.data_yaml_key))
    assert data == {"train": "train.txt", "val": "val.txt", "nc": 2,
                    "names": {0: "car", 1: "truck"}}
    card = storage.get_json(f"{version.prefix}/card.json")
    assert card["cycle_id"] == "c7" and card["classes"] == ["car", "truck"]
    assert set(card["train"]["regions"]) <= {"vegetated", "arid"}
    assert card["train"]["instances"]["car"] > 0
    assert card["test_scenes_per_region"] == {"vegetated": 1, "arid": 1}
    markdown = storage.get_bytes(f"{version.prefix}/card.md").decode()
    assert f"# Dataset {version.version}" in markdown and "| arid |" in markdown


def test_under_represented_region_is_oversampled_up_to_the_cap(tmp_path: Path,
                                                               shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    version = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    unique = version.card["train_unique"]["regions"]
    repeated = version.card["train"]["regions"]
    small = min(unique, key=unique.get)
    large = max(unique, key=unique.get)
    if unique[small] < unique[large]:
        assert repeated[small] > unique[small]
        assert repeated[small] <= unique[small] * CFG.dataset.rare_class_oversample_cap


def test_assembly_over_s3(s3_bucket: str, tmp_path: Path, shards: Shards) -> None:
    root, scene_shards = shards
    storage = open_storage(f"s3://{s3_bucket}/data")
    for prefix in scene_shards.values():
        storage.put_tree(root / prefix, prefix, last="index.json")
    version = assemble_dataset(storage, CFG, scene_shards=scene_shards, regions=REGIONS)
    local = assemble_dataset(fresh_storage(tmp_path, shards), CFG, scene_shards=scene_shards,
                             regions=REGIONS)
    assert version.version == local.version
    assert storage.exists(version.data_yaml_key)


def test_padding_repeats_regular_chips_up_to_the_budget(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    base = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    target = base.train_images + 7
    padded_cfg = CFG.model_copy(update={"dataset": CFG.dataset.model_copy(
        update={"min_train_images": target})})
    padded = assemble_dataset(storage, padded_cfg, scene_shards=shards[1], regions=REGIONS)
    assert padded.train_images == target and padded.version != base.version
    assert padded.card["balance"]["padding"] == 7
    base_lines = lines(storage, f"{base.prefix}/train.txt")
    padded_lines = lines(storage, f"{padded.prefix}/train.txt")
    assert padded_lines[:len(base_lines)] == base_lines
    assert set(padded_lines[len(base_lines):]) <= set(base_lines)  # repeats, nothing new
    assert len(set(padded_lines[len(base_lines):])) == 7  # spread, not one chip seven times
    assert padded.card["val"] == base.card["val"]
    # A budget already met changes nothing.
    small_cfg = CFG.model_copy(update={"dataset": CFG.dataset.model_copy(
        update={"min_train_images": 1})})
    assert assemble_dataset(storage, small_cfg, scene_shards=shards[1],
                            regions=REGIONS).version == base.version


def test_region_balance_counts_the_hard_chips(tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    base = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    splits = load_scene_splits(storage, "vehicle")
    arid_train = [s for s, a in sorted(splits.items()) if a.split == "train" and
                  a.region == "arid"]
    # Many hard chips from the small region: now the other region is the one repeated.
    hard = [shards[1][s] for s in arid_train]
    version = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS,
                               hard_shards=hard, hard_oversample=8)
    assert base.card["train"]["regions"]["arid"] > base.card["train_unique"]["regions"]["arid"]
    regions = version.card["train"]["regions"]
    assert regions["vegetated"] > version.card["train_unique"]["regions"]["vegetated"]
    # Regular arid chips are repeated less: the hard chips (here the same images, 8 times)
    # already weigh the region.
    def arid(prefix: str) -> Counter[str]:
        return Counter(line for line in lines(storage, f"{prefix}/train.txt")
                       if any(f"/{s}/" in line for s in arid_train))

    before, after = arid(base.prefix), arid(version.prefix)
    regular_after = {chip: n - 8 for chip, n in after.items()}
    assert all(0 < regular_after[chip] <= n for chip, n in before.items())
    assert sum(regular_after.values()) < sum(before.values())


def test_training_budget_caps_the_list_and_keeps_room_for_regular_chips(
        tmp_path: Path, shards: Shards) -> None:
    storage = fresh_storage(tmp_path, shards)
    base = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS)
    splits = load_scene_splits(storage, "vehicle")
    hard = [shards[1][s] for s, a in sorted(splits.items()) if a.split == "train"]
    unlimited = assemble_dataset(storage, CFG, scene_shards=shards[1], regions=REGIONS,
                                 hard_shards=hard, hard_oversample=3)
    hard_chips = sum(unlimited.card["hard_by_reason"].values())
    budget = 12
    assert unlimited.train_images > budget and 3 * hard_chips > budget // 2

    def capped(**changes: object) -> ObjectTypeConfig:
        return CFG.model_copy(update={"dataset": CFG.dataset.model_copy(
            update={"max_train_images": budget, **changes})})

    version = assemble_dataset(storage, capped(), scene_shards=shards[1], regions=REGIONS,
                               hard_shards=hard, hard_oversample=3)
    assert version.train_images == budget
    # Half the budget, spent on six distinct hard chips rather than two chips three times.
    assert version.card["train"]["hard_chips"] == 6 == version.card["train_unique"]["hard_chips"]
    assert version.card["balance"]["hard_oversample"] == 1
    dropped = version.card["balance"]["dropped_by_budget"]
    assert dropped["hard"] == hard_chips - 6 and dropped["regular"] > 0
    assert "Training budget: 12 images" in storage.get_bytes(
        f"{version.prefix}/card.md").decode()
    listed = lines(storage, f"{version.prefix}/train.txt")
    regular, hard_lines = listed[:-6], listed[-6:]  # hard chips come last
    assert len(set(hard_lines)) == 6
    assert len(set(regular)) == len(regular) == 6  # distinct chips before any repeat
    assert set(regular) <= set(lines(storage, f"{base.prefix}/train.txt"))
    assert version.card["val"] == base.card["val"]
    # Seeded: the same inputs give the same version; another seed samples another list.
    again = assemble_dataset(fresh_storage(tmp_path / "again", shards), capped(),
                             scene_shards=shards[1], regions=REGIONS, hard_shards=hard,
                             hard_oversample=3)
    assert again.version == version.version
    reseeded = assemble_dataset(storage, capped(seed=5), scene_shards=shards[1],
                                regions=REGIONS, hard_shards=hard, hard_oversample=3)
    assert reseeded.train_images == budget and reseeded.version != version.version
    # A budget that the list fits in changes nothing; a larger hard share takes more room.
    roomy = CFG.model_copy(update={"dataset": CFG.dataset.model_copy(
        update={"max_train_images": 10_000})})
    assert assemble_dataset(storage, roomy, scene_shards=shards[1], regions=REGIONS,
                            hard_shards=hard, hard_oversample=3).version == unlimited.version
    wide = assemble_dataset(storage, capped(max_hard_fraction=1.0), scene_shards=shards[1],
                            regions=REGIONS, hard_shards=hard, hard_oversample=3)
    assert wide.card["train"]["hard_chips"] == min(12, hard_chips)
    assert wide.train_images == budget
    # Room for every distinct chip: the rest of the budget goes to balance repeats.
    regular_chips = unlimited.card["train_unique"]["chips"] - hard_chips
    spacious = CFG.model_copy(update={"dataset": CFG.dataset.model_copy(update={
        "max_train_images": 2 * (regular_chips + 1), "max_hard_fraction": 0.5})})
    roomier = assemble_dataset(storage, spacious, scene_shards=shards[1], regions=REGIONS,
                               hard_shards=hard[:1], hard_oversample=1)
    assert roomier.card["train_unique"]["chips"] - roomier.card["train"]["hard_chips"] \
        == regular_chips


def test_padding_above_the_budget_is_a_config_error() -> None:
    from retrain_lib.core.config import parse_object_type_config
    from retrain_lib.core.errors import ConfigError

    data = CFG.model_dump(mode="json")
    data["dataset"].update(min_train_images=20, max_train_images=10)
    with pytest.raises(ConfigError,
                       match=r"min_train_images \(20\) exceeds max_train_images \(10\)"):
        parse_object_type_config(data, "budget.yaml")
