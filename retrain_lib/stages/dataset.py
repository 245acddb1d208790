"""Dataset versions: immutable, content-hashed chip lists with a frozen test set.

Layout in storage::

    datasets/<type>/splits.json                  scene -> test | val | train, frozen once assigned
    datasets/<type>/<version>/train.txt          image paths relative to this folder (repeats =
    datasets/<type>/<version>/val.txt            oversampling), labels at images -> labels
    datasets/<type>/<version>/test_scenes.json   the frozen test scenes (whole scenes)
    datasets/<type>/<version>/card.json|card.md  counts per class, region, source and reason
    datasets/<type>/<version>/chips.gpkg         where each chip lies (lon/lat), for trace
    datasets/<type>/<version>/data.yaml          written last: the version exists once it does

Policies:

- **Scene-level splits.** Every scene is assigned once, when first seen, and never moves.
  Per region, a ``test_scene_fraction`` share of the new scenes (at least one while the region
  has no test scene and two or more new scenes arrive) joins the frozen test set, and a
  ``val_fraction`` share of the rest joins validation. No tile of a test scene is ever trained
  on, so every cycle's numbers are comparable. Without any validation scene yet, a seeded
  fifth of the training chips validates instead (recorded in the card).
- **Balance.** Chips holding a class rarer than the most frequent one, or coming from an
  under-represented region, are repeated up to ``rare_class_oversample_cap`` times. Hard
  chips are repeated ``mining.oversample`` times. Validation lists have no repeats.
- **Identity.** The version id hashes the class list, the lists and the test scenes, and the
  content hash of every shard index they come from, so equal inputs give the same id and a
  re-run reuses the existing version.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import InputError
from retrain_lib.core.layout import (
    DATASET_CHIP_INDEX,
    SHARD_INDEX,
    dataset_prefix,
    hard_prefix,
    join_key,
    scene_splits_key,
)
from retrain_lib.core.records import Record
from retrain_lib.core.storage import Storage
from retrain_lib.stages.chip_index import IndexedChip, bounds_to_lonlat, write_chip_index

__all__ = [
    "ChipRef",
    "DatasetVersion",
    "SceneSplit",
    "assemble_dataset",
    "assign_scene_splits",
    "dataset_version_id",
    "load_scene_splits",
    "read_shard_chips",
]

Split = Literal["test", "val", "train"]


def _hash01(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class SceneSplit:
    """Where a scene belongs, for good."""

    scene_id: str
    split: Split
    region: str
    assigned_cycle: str = ""


def load_scene_splits(storage: Storage, object_type: str) -> dict[str, SceneSplit]:
    """The frozen assignment of every scene seen so far (empty before the first cycle)."""
    key = scene_splits_key(object_type)
    if not storage.exists(key):
        return {}
    doc = storage.get_json(key)
    return {sid: SceneSplit(sid, entry["split"], entry.get("region", ""),
                            entry.get("assigned_cycle", ""))
            for sid, entry in doc["scenes"].items()}


def assign_scene_splits(storage: Storage, cfg: ObjectTypeConfig,
                        scenes: Mapping[str, str], *, cycle_id: str = ""
                        ) -> dict[str, SceneSplit]:
    """Assign new scenes (``scene_id -> region``) to test/val/train; earlier ones never move.

    Returns the full, persisted assignment.
    """
    current = load_scene_splits(storage, cfg.name)
    new = {sid: region for sid, region in scenes.items() if sid not in current}
    if not new:
        return current
    policy = cfg.dataset
    by_region: dict[str, list[str]] = defaultdict(list)
    for sid, region in new.items():
        by_region[region].append(sid)
    for region, ids in sorted(by_region.items()):
        ordered = sorted(ids, key=lambda s: (_hash01(policy.seed, s), s))
        has_test = any(s.split == "test" and s.region == region for s in current.values())
        n_test = round(len(ordered) * policy.test_scene_fraction)
        if policy.test_scene_fraction > 0 and not has_test and len(ordered) >= 2:
            n_test = max(n_test, 1)
        rest = len(ordered) - n_test
        n_val = round(rest * policy.val_fraction) if rest >= 3 else 0
        for i, sid in enumerate(ordered):
            split: Split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            current[sid] = SceneSplit(sid, split, region, cycle_id)
    storage.put_json(scene_splits_key(cfg.name), {
        "policy": {"test_scene_fraction": policy.test_scene_fraction,
                   "val_fraction": policy.val_fraction, "seed": policy.seed},
        "scenes": {sid: {"split": s.split, "region": s.region,
                         "assigned_cycle": s.assigned_cycle}
                   for sid, s in sorted(current.items())},
    })
    return current


@dataclass(frozen=True)
class ChipRef:
    """One written chip of a shard, as dataset assembly sees it."""

    image_key: str
    scene_id: str
    region: str
    objects: Mapping[str, int]
    source: Literal["regular", "hard"] = "regular"
    reason: str = ""
    shard_sha256: str = ""
    shard_prefix: str = ""
    bounds: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """The chip's footprint in its scene's CRS (``crs``, WKT)."""
    crs: str = ""
    labels_sha256: str = ""

    @property
    def is_background(self) -> bool:
        """Whether the chip shows no labelled object."""
        return not any(self.objects.values())


def read_shard_chips(storage: Storage, shard_prefix: str, *, region: str = "",
                     source: Literal["regular", "hard"] = "regular") -> list[ChipRef]:
    """The written chips of one shard (``<prefix>/index.json``, tiler format)."""
    index_key = join_key(shard_prefix, SHARD_INDEX)
    raw = storage.get_bytes(index_key)
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{storage.url(index_key)}: not a valid tile index ({exc})") from None
    digest = hashlib.sha256(raw).hexdigest()
    crs = str((index.get("scene") or {}).get("crs", ""))
    labels_sha256 = str((index.get("source") or {}).get("labels_sha256") or "")
    chips = []
    for tile in index.get("tiles", []):
        if tile.get("status") != "written" or not tile.get("image"):
            continue
        chips.append(ChipRef(
            image_key=join_key(shard_prefix, tile["image"]), scene_id=index["scene_id"],
            region=region, objects=dict(tile.get("objects") or {}), source=source,
            reason=str(tile.get("reason", "")), shard_sha256=digest, shard_prefix=shard_prefix,
            bounds=tuple(tile.get("map_bounds") or (0.0, 0.0, 0.0, 0.0)),
            crs=crs, labels_sha256=labels_sha256))
    return chips


def dataset_version_id(classes: Sequence[str], train: Sequence[str], val: Sequence[str],
                       test_scenes: Sequence[str], shard_hashes: Iterable[str]) -> str:
    """The content hash that names a dataset version: its classes, its lists (storage keys,
    with repeats), its test scenes and the SHA-256 of every shard index its chips come from."""
    identity = {"classes": list(classes), "train": list(train), "val": list(val),
                "test": list(test_scenes), "shards": sorted(set(shard_hashes))}
    return "ds-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()
                                  ).hexdigest()[:12]


def _indexed_chips(train_entries: Sequence[ChipRef], val: Sequence[ChipRef],
                   hard_prefix_root: str) -> list[IndexedChip]:
    """The distinct chips of a version, with their footprints in lon/lat."""
    repeats = Counter(c.image_key for c in train_entries)
    unique: dict[str, tuple[ChipRef, str]] = {}
    for chip in train_entries:
        unique.setdefault(chip.image_key, (chip, "train"))
    for chip in val:
        unique.setdefault(chip.image_key, (chip, "val"))
    by_crs: dict[str, list[str]] = defaultdict(list)
    for key, (chip, _) in unique.items():
        by_crs[chip.crs].append(key)
    lonlat: dict[str, tuple[float, float, float, float]] = {}
    for crs, keys in by_crs.items():
        boxes = [unique[k][0].bounds for k in keys]
        lonlat.update(zip(keys, bounds_to_lonlat(boxes, crs) if crs else boxes, strict=True))
    out = []
    for key, (chip, split) in unique.items():
        cycle = ""
        if chip.source == "hard" and key.startswith(hard_prefix_root + "/"):
            cycle = key[len(hard_prefix_root) + 1:].split("/", 1)[0]
        out.append(IndexedChip(
            image_key=key, scene_id=chip.scene_id, region=chip.region, split=split,
            source=chip.source, reason=chip.reason, mining_cycle=cycle,
            repeats=repeats.get(key, 0), shard_prefix=chip.shard_prefix,
            shard_sha256=chip.shard_sha256, labels_sha256=chip.labels_sha256,
            bounds_lonlat=lonlat[key]))
    return out


class DatasetVersion(Record):
    """An assembled dataset version (its card is left out of the JSON form)."""

    object_type: str
    version: str
    prefix: str
    data_yaml_key: str
    train_images: int
    val_images: int
    test_scenes: list[str]
    reused: bool = False
    card: dict[str, Any] = Field(default_factory=dict, exclude=True)


def _repeat_factors(chips: Sequence[ChipRef], classes: Sequence[str], cap: float,
                    fixed: Sequence[ChipRef] = ()) -> list[int]:
    """Repeats of each of ``chips`` that bring classes and regions closer to even (up to
    ``cap``). ``fixed`` entries (hard chips, already repeated) count towards the balance but
    are not repeated again, so that what is trained on is balanced, not just the tiles."""
    instances: Counter[str] = Counter()
    region_chips: Counter[str] = Counter()
    for chip in [*chips, *fixed]:
        instances.update({c: n for c, n in chip.objects.items() if n})
        region_chips[chip.region] += 1
    top_class = max(instances.values(), default=0)
    top_region = max(region_chips.values(), default=0)
    class_factor = {c: min(cap, top_class / instances[c]) if instances[c] else 1.0
                    for c in classes}
    region_factor = {r: min(cap, top_region / n) for r, n in region_chips.items()}
    factors = []
    for chip in chips:
        present = [class_factor.get(c, 1.0) for c, n in chip.objects.items() if n]
        factor = max([*present, region_factor.get(chip.region, 1.0), 1.0])
        factors.append(max(1, round(factor)))
    return factors


def _seeded_subset(entries: Sequence[ChipRef], size: int, seed: int) -> list[ChipRef]:
    """A seeded sample of ``size`` of ``entries``, in list order; all of them when they fit."""
    if len(entries) <= size:
        return list(entries)
    ranked = sorted(range(len(entries)),
                    key=lambda i: (_hash01(seed, f"{entries[i].image_key}#{i}"), i))
    return [entries[i] for i in sorted(ranked[:max(size, 0)])]


def _within_budget(chips: Sequence[ChipRef], factors: Sequence[int], room: int, seed: int
                   ) -> list[ChipRef]:
    """``room`` entries of ``chips``: as many distinct chips as fit, drawn with their balance
    factors as weights (seeded weighted sampling without replacement), then repeats."""
    if len(chips) >= room:
        # Efraimidis-Spirakis: the largest u ** (1 / w) form a weighted sample.
        keys = [_hash01(seed, c.image_key) ** (1 / f) for c, f in zip(chips, factors,
                                                                      strict=True)]
        ranked = sorted(range(len(chips)), key=lambda i: (-keys[i], i))
        return [chips[i] for i in sorted(ranked[:max(room, 0)])]
    extra = [c for c, f in zip(chips, factors, strict=True) for _ in range(f - 1)]
    return list(chips) + _seeded_subset(extra, room - len(chips), seed)


def _relative(dataset_prefix: str, key: str) -> str:
    return posixpath.relpath(key, dataset_prefix)


def _card_markdown(card: Mapping[str, Any]) -> str:
    lines = [f"# Dataset {card['version']} ({card['object_type']})", "",
             f"Assembled {card['created_at']} for cycle `{card['cycle_id'] or '-'}`.", "",
             "| | train (with repeats) | train (unique) | val |", "|---|---|---|---|"]
    for cls in card["classes"]:
        lines.append(f"| instances of `{cls}` | {card['train']['instances'].get(cls, 0)} | "
                     f"{card['train_unique']['instances'].get(cls, 0)} | "
                     f"{card['val']['instances'].get(cls, 0)} |")
    for key in ("chips", "background_chips", "hard_chips"):
        lines.append(f"| {key.replace('_', ' ')} | {card['train'][key]} | "
                     f"{card['train_unique'][key]} | {card['val'][key]} |")
    lines += ["", "| region | train chips | val chips | test scenes |", "|---|---|---|---|"]
    for region in sorted(set(card["train"]["regions"]) | set(card["val"]["regions"])
                         | set(card["test_scenes_per_region"])):
        lines.append(f"| {region or '(none)'} | {card['train']['regions'].get(region, 0)} | "
                     f"{card['val']['regions'].get(region, 0)} | "
                     f"{card['test_scenes_per_region'].get(region, 0)} |")
    lines += ["", "Hard chips by reason: " + (", ".join(
        f"{k}: {v}" for k, v in sorted(card["hard_by_reason"].items())) or "none"),
        "", f"Validation: {card['val_source']}.", ""]
    balance = card["balance"]
    if balance.get("max_train_images"):
        dropped = balance["dropped_by_budget"]
        lines[-1:-1] = [f"Training budget: {balance['max_train_images']} images; left out "
                        f"{dropped['regular']} regular and {dropped['hard']} hard entries.", ""]
    return "\n".join(lines)


def _summary(chips: Sequence[ChipRef], classes: Sequence[str]) -> dict[str, Any]:
    instances: Counter[str] = Counter()
    for chip in chips:
        instances.update({c: n for c, n in chip.objects.items() if n})
    return {
        "chips": len(chips),
        "background_chips": sum(c.is_background for c in chips),
        "hard_chips": sum(c.source == "hard" for c in chips),
        "instances": {c: instances.get(c, 0) for c in classes},
        "regions": dict(Counter(c.region for c in chips)),
        "scenes": len({c.scene_id for c in chips}),
    }


def assemble_dataset(storage: Storage, cfg: ObjectTypeConfig, *,
                     scene_shards: Mapping[str, str], regions: Mapping[str, str],
                     hard_shards: Sequence[str] = (), hard_oversample: int | None = None,
                     cycle_id: str = "", parent_version: str = "") -> DatasetVersion:
    """Build (or reuse) the dataset version for these shards.

    Args:
        storage: Storage root holding the shards.
        cfg: The object type.
        scene_shards: ``scene_id -> shard prefix`` (``chips/<type>/<hash>/<scene_id>``) for
            every cataloged scene to consider; test scenes among them are left out.
        regions: ``scene_id -> region`` (from the catalog manifests).
        hard_shards: Prefixes of hard-chip shards (tiler format, a ``reason`` per tile).
        hard_oversample: Repeats of each hard chip (default ``cfg.mining.oversample``).
        cycle_id: Recorded in the card.
        parent_version: The previous dataset version, recorded for lineage.

    Raises:
        InputError: no training chip is left, or a shard is unreadable.
    """
    splits = assign_scene_splits(storage, cfg, {s: regions.get(s, "") for s in scene_shards},
                                 cycle_id=cycle_id)
    classes = list(cfg.classes)
    regular: list[ChipRef] = []
    for scene_id, prefix in sorted(scene_shards.items()):
        if splits[scene_id].split == "test":
            continue
        regular += read_shard_chips(storage, prefix, region=regions.get(scene_id, ""))
    hard: list[ChipRef] = []
    for prefix in sorted(hard_shards):
        for chip in read_shard_chips(storage, prefix, source="hard"):
            split = splits.get(chip.scene_id)
            if split is not None and split.split != "train":
                continue  # never train on a test or validation scene, even through hard chips
            hard.append(replace(chip, region=regions.get(chip.scene_id, "")))
    val = [c for c in regular if splits[c.scene_id].split == "val"]
    train = [c for c in regular if splits[c.scene_id].split == "train"]
    val_source = f"{len({c.scene_id for c in val})} whole validation scene(s)"
    if not val:
        # No validation scene yet: a seeded fifth of the training chips validates instead.
        val = [c for c in train if _hash01(cfg.dataset.seed, c.image_key) < 0.2]
        val_keys = {c.image_key for c in val}
        train = [c for c in train if c.image_key not in val_keys] or train
        val_source = ("no validation scene yet: a seeded 20% of the training chips "
                      "(chip-level split)")
    if not any(not c.is_background for c in train + hard):
        raise InputError(f"{cfg.name}: no training chip with an object: every scene is in the "
                         "test set or has no annotation; drop more annotated scenes")
    if not val:
        val = train[:1]
        val_source = "a single training chip (too little data for a split)"
    repeat_hard = hard_oversample if hard_oversample is not None else cfg.mining.oversample
    budget = cfg.dataset.max_train_images
    hard_kept = hard
    if budget:
        # A budget buys distinct chips first: repeats only where room is left.
        room = int(budget * cfg.dataset.max_hard_fraction)
        hard_kept = _seeded_subset(hard, room, cfg.dataset.seed)
        repeat_hard = max(1, min(repeat_hard, room // max(len(hard_kept), 1)))
    hard_entries = [c for c in hard_kept for _ in range(repeat_hard)]
    factors = _repeat_factors(train, classes, cfg.dataset.rare_class_oversample_cap,
                              fixed=hard_entries)
    train_entries = [c for c, f in zip(train, factors, strict=True) for _ in range(f)]
    balanced = len(train_entries)
    if budget and balanced > budget - len(hard_entries):
        train_entries = _within_budget(train, factors, budget - len(hard_entries),
                                       cfg.dataset.seed)
    dropped = {"regular": balanced - len(train_entries), "hard": len(hard) - len(hard_kept)}
    train_entries += hard_entries
    padding = max(0, cfg.dataset.min_train_images - len(train_entries))
    if padding:
        pool = sorted(train, key=lambda c: (_hash01(cfg.dataset.seed, c.image_key), c.image_key))
        train_entries += [pool[i % len(pool)] for i in range(padding)]
    test_scenes = sorted(s for s, a in splits.items() if a.split == "test")

    version = dataset_version_id(classes, [c.image_key for c in train_entries],
                                 [c.image_key for c in val], test_scenes,
                                 (c.shard_sha256 for c in train_entries + val))
    prefix = dataset_prefix(cfg.name, version)
    data_key = join_key(prefix, "data.yaml")
    if storage.exists(data_key):
        card = storage.get_json(join_key(prefix, "card.json"))
        return DatasetVersion(object_type=cfg.name, version=version, prefix=prefix,
                              data_yaml_key=data_key, train_images=len(train_entries),
                              val_images=len(val), test_scenes=test_scenes, card=card,
                              reused=True)
    test_regions = Counter(splits[s].region for s in test_scenes)
    unique = list({(c.image_key, c.source): c for c in train_entries}.values())
    card = {
        "version": version, "object_type": cfg.name, "classes": classes,
        "cycle_id": cycle_id, "parent_version": parent_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train": _summary(train_entries, classes),
        "train_unique": _summary(unique, classes),
        "val": _summary(val, classes),
        "val_source": val_source,
        "test_scenes": test_scenes,
        "test_scenes_per_region": dict(test_regions),
        "hard_by_reason": dict(Counter(c.reason or "unknown" for c in hard_kept)),
        "chips_per_scene": dict(Counter(c.scene_id for c in unique)),
        "balance": {"rare_class_oversample_cap": cfg.dataset.rare_class_oversample_cap,
                    "hard_oversample": repeat_hard, "padding": padding,
                    "max_train_images": budget,
                    "dropped_by_budget": dropped,
                    "repeats_per_scene": dict(Counter(c.scene_id for c in train_entries))},
    }
    storage.put_bytes(join_key(prefix, "train.txt"), "".join(
        f"{_relative(prefix, c.image_key)}\n" for c in train_entries).encode())
    storage.put_bytes(join_key(prefix, "val.txt"), "".join(
        f"{_relative(prefix, c.image_key)}\n" for c in val).encode())
    storage.put_json(join_key(prefix, "test_scenes.json"),
                     {"scenes": test_scenes, "regions": {s: splits[s].region
                                                          for s in test_scenes}})
    storage.put_json(join_key(prefix, "card.json"), card)
    storage.put_bytes(join_key(prefix, "card.md"), _card_markdown(card).encode())
    with tempfile.TemporaryDirectory(prefix="autoretrain-chips-") as scratch:
        index_path = Path(scratch) / DATASET_CHIP_INDEX
        write_chip_index(index_path, _indexed_chips(train_entries, val, hard_prefix(cfg.name)))
        storage.put_file(index_path, join_key(prefix, DATASET_CHIP_INDEX))
    import yaml

    storage.put_bytes(data_key, yaml.safe_dump({
        "train": "train.txt", "val": "val.txt", "nc": len(classes),
        "names": dict(enumerate(classes)),
    }, sort_keys=False).encode())
    return DatasetVersion(object_type=cfg.name, version=version, prefix=prefix,
                          data_yaml_key=data_key, train_images=len(train_entries),
                          val_images=len(val), test_scenes=test_scenes, card=card,
                          reused=False)
