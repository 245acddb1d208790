"""2. ingest, 3. tile and 5. assemble: from analysts' drops to a dataset version."""

from __future__ import annotations

import logging
from pathlib import Path

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import RetrainError
from retrain_lib.core.layout import (
    CATALOG_ANNOTATIONS,
    CATALOG_SCENE,
    SHARD_INDEX,
    catalog_scene_key,
    chips_prefix,
    cycle_dataset_key,
    cycle_ingest_key,
    hard_cycle_prefix,
    hard_manifest_key,
    hard_prefix,
    join_key,
    shard_prefix,
)
from retrain_lib.core.storage import LocalStorage, Storage
from retrain_lib.cycle.results import AssembledDataset, IngestSummary, TiledScene
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.cycle.state import load_state
from retrain_lib.geo.raster import object_storage
from retrain_lib.stages.dataset import assemble_dataset
from retrain_lib.stages.ingest import (
    DropOutcome,
    IngestReport,
    ingest_drops,
    list_catalog_scenes,
)
from retrain_lib.stages.tiling import params_hash, tile_scene

__all__ = [
    "assemble",
    "catalog_files",
    "hard_shards",
    "ingest",
    "scene_shard_prefix",
    "scenes_to_tile",
    "tile_one",
    "untrained_scenes",
]

log = logging.getLogger(__name__)


def ingest(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str) -> IngestSummary:
    """Catalog good drops, quarantine bad ones (see :mod:`retrain_lib.stages.ingest`).

    The summary covers every run of the cycle: the drops an earlier, stopped run cataloged
    or quarantined are still in it (recorded as each drop is done).
    """
    storage = settings.storage()
    record = cycle_ingest_key(cfg.name, cycle_id)
    earlier = IngestSummary.from_json(storage.get_json(record)).drops \
        if storage.exists(record) else []
    done: dict[str, DropOutcome] = {o.drop_id: o for o in earlier
                                    if o.status in ("cataloged", "quarantined")}

    def on_drop(outcome: DropOutcome) -> None:
        log.info("drop %s: %s %s", outcome.drop_id, outcome.status,
                 [p.problem for p in outcome.problems] + list(outcome.notes))
        if outcome.status in ("cataloged", "quarantined"):
            done[outcome.drop_id] = outcome
            storage.put_json(record, _summary(cfg.name, list(done.values())).to_json())

    report = ingest_drops(storage, cfg, scratch=settings.scratch_dir(f"ingest-{cycle_id}"),
                          cycle_id=cycle_id, on_drop=on_drop)
    others = [o for o in report.outcomes if o.status not in ("cataloged", "quarantined")]
    return _summary(cfg.name, [*done.values(), *others])


def _summary(object_type: str, outcomes: list[DropOutcome]) -> IngestSummary:
    return IngestSummary.model_validate(IngestReport(object_type, tuple(outcomes)).to_dict())


def scene_shard_prefix(cfg: ObjectTypeConfig, scene_id: str) -> str:
    """Where a scene's chips are for the object type's current tiling parameters."""
    return shard_prefix(cfg.name, params_hash(cfg.tiling, cfg.classes), scene_id)


def scenes_to_tile(cfg: ObjectTypeConfig, settings: CycleSettings) -> list[str]:
    """Every cataloged scene (tiling a scene whose shard exists is a cheap no-op).

    Raises:
        RetrainError: the catalog is empty (every drop was quarantined).
    """
    scenes = [m["scene_id"] for m in list_catalog_scenes(settings.storage(), cfg.name)]
    if not scenes:
        raise RetrainError(f"{cfg.name}: the catalog is empty: every drop was quarantined "
                           f"(see quarantine/{cfg.name}/)")
    return scenes


def untrained_scenes(cfg: ObjectTypeConfig, settings: CycleSettings) -> list[str]:
    """Cataloged scenes no finished cycle has trained on yet: what this cycle mines."""
    storage = settings.storage()
    trained = set(load_state(storage, cfg.name).trained_scenes)
    return [m["scene_id"] for m in list_catalog_scenes(storage, cfg.name)
            if m["scene_id"] not in trained]


def catalog_files(storage: Storage, cfg: ObjectTypeConfig, scene_id: str, scratch: Path, *,
                  read_in_place: bool) -> tuple[Path, Path]:
    """Local paths of a cataloged scene and its annotations (the annotations are downloaded
    into ``scratch`` when the storage is not local).

    With ``read_in_place`` the scene is read where it lies, window by window (on S3 its
    ``/vsis3/`` path: open it inside :func:`retrain_lib.geo.raster.object_storage`); without,
    it is downloaded, for stages that read every pixel more than once (evaluation).
    """
    scene_key = catalog_scene_key(cfg.name, scene_id, CATALOG_SCENE)
    labels_key = catalog_scene_key(cfg.name, scene_id, CATALOG_ANNOTATIONS)
    if isinstance(storage, LocalStorage):
        return storage.path(scene_key), storage.path(labels_key)
    labels = storage.get_file(labels_key, scratch / scene_id / CATALOG_ANNOTATIONS)
    if read_in_place:
        return Path(storage.raster_path(scene_key)), labels
    return storage.get_file(scene_key, scratch / scene_id / CATALOG_SCENE), labels


def tile_one(cfg: ObjectTypeConfig, settings: CycleSettings, scene_id: str) -> TiledScene:
    """Tile one cataloged scene into ``chips/<type>/<params_hash>/<scene_id>``."""
    storage = settings.storage()
    prefix = scene_shard_prefix(cfg, scene_id)
    index_key = join_key(prefix, SHARD_INDEX)
    if storage.exists(index_key):
        index = storage.get_json(index_key)
        return TiledScene(scene_id=scene_id, shard=prefix, reused=True,
                          tiles_written=index["stats"]["tiles_written"])
    scratch = settings.scratch_dir(f"tile-{cfg.name}-{scene_id}")
    scene_path, labels = catalog_files(storage, cfg, scene_id, scratch, read_in_place=True)
    local = isinstance(storage, LocalStorage)
    # Locally the tiler writes into the storage root itself; elsewhere into scratch, and the
    # finished shard is uploaded with its index last.
    out_dir = storage.path(chips_prefix(cfg.name)) if isinstance(storage, LocalStorage) \
        else scratch / "chips"
    with object_storage(settings.s3):
        result = tile_scene(scene_path, labels, cfg.classes, out_dir, cfg.tiling,
                            scene_id=scene_id, class_mapper=cfg.class_mapper)
    if not local:
        storage.put_tree(result.shard_dir, prefix, last=SHARD_INDEX)
    return TiledScene(scene_id=scene_id, shard=prefix, reused=False,
                      tiles_written=result.tiles_written)


def hard_shards(storage: Storage, object_type: str) -> list[str]:
    """Prefixes of every hard-chip shard of every finished mining stage so far."""
    shards = []
    for cycle_id in storage.list_children(hard_prefix(object_type)):
        key = hard_manifest_key(object_type, cycle_id)
        if storage.exists(key):
            shards += [join_key(hard_cycle_prefix(object_type, cycle_id), scene)
                       for scene in storage.get_json(key).get("scenes_with_chips", [])]
    return shards


def assemble(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str
             ) -> AssembledDataset:
    """Assemble the dataset version from every cataloged scene and every hard shard so far.

    A cycle assembles once: a rerun (after a crash, or of a finished cycle) gets the version
    the first run assembled, so what it trains, evaluates and reports is what the first run's
    trainings used, even if drops were cataloged meanwhile.
    """
    storage = settings.storage()
    pinned = cycle_dataset_key(cfg.name, cycle_id)
    if storage.exists(pinned):
        return AssembledDataset.from_json({**storage.get_json(pinned), "reused": True})
    manifests = list_catalog_scenes(storage, cfg.name)
    if not manifests:
        raise RetrainError(f"{cfg.name}: the catalog is empty; nothing to train on")
    scene_shards = {m["scene_id"]: scene_shard_prefix(cfg, m["scene_id"]) for m in manifests}
    missing = [s for s, p in scene_shards.items()
               if not storage.exists(join_key(p, SHARD_INDEX))]
    if missing:
        raise RetrainError(f"{cfg.name}: scenes not tiled yet: {', '.join(missing)}; run the "
                           "tile stage first")
    regions = {m["scene_id"]: m.get("region", "") for m in manifests}
    hard = hard_shards(storage, cfg.name)
    version = assemble_dataset(storage, cfg, scene_shards=scene_shards, regions=regions,
                               hard_shards=hard, cycle_id=cycle_id,
                               parent_version=load_state(storage, cfg.name).last_dataset_version
                               or "")
    assembled = AssembledDataset.model_validate({
        **version.to_json(), "url": storage.url(version.prefix),
        "scene_ids": sorted(scene_shards), "hard_shards": len(hard)})
    storage.put_json(pinned, assembled.to_json())
    return assembled
