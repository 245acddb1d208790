"""Every storage key AutoRetrain reads or writes, in one place (see the README's layout).

Keys are POSIX-style paths relative to the storage root; :mod:`retrain_lib.core.storage`
resolves them against a local directory or an S3 prefix::

    incoming/<type>/<drop_id>/                      analysts' drops
    catalog/<type>/scenes/<scene_id>/               scene.tif, annotations.geojson, manifest.json
    quarantine/<type>/<drop_id>/                    rejected drops + reason.json
    chips/<type>/<params_hash>/<scene_id>/          tiles, labels, index.json
    hard/<type>/<cycle_id>/                         hard-chip shards + manifest.json
    datasets/<type>/splits.json                     the frozen scene splits
    datasets/<type>/<dataset_version>/              data.yaml, lists, test scenes, card, chips.gpkg
    models/<type>/<run_id>/                         weights, results, result.json
    predictions/<type>/<model_version>/<scene_id>.geojson
    inference/incoming/<type>/, inference/done/<type>/
    cycles/<type>/<cycle_id>/report.json|md         what a cycle did and decided
    cycles/<type>/<cycle_id>/timing/                how long each stage run took
    cycles/<type>/state.json                        what the last trainings used
"""

from __future__ import annotations

__all__ = [
    "CATALOG_ANNOTATIONS",
    "CATALOG_MANIFEST",
    "CATALOG_SCENE",
    "CATALOG_SOURCE_SCENE",
    "DATASET_CHIP_INDEX",
    "SHARD_INDEX",
    "catalog_prefix",
    "catalog_scene_key",
    "chips_prefix",
    "cycle_state_key",
    "dataset_prefix",
    "datasets_prefix",
    "hard_cycle_prefix",
    "hard_manifest_key",
    "hard_prefix",
    "incoming_prefix",
    "inference_done_prefix",
    "inference_incoming_prefix",
    "join_key",
    "model_run_prefix",
    "predictions_index_key",
    "predictions_key",
    "quarantine_prefix",
    "report_key",
    "report_markdown_key",
    "scene_splits_key",
    "shard_prefix",
]

CATALOG_SCENE = "scene.tif"
"""The scene as every stage reads it: a Cloud Optimized GeoTIFF (internal tiles, overviews)."""
CATALOG_SOURCE_SCENE = "source.tif"
"""The analyst's own file, byte for byte, kept beside ``scene.tif`` when that is a conversion."""
CATALOG_ANNOTATIONS = "annotations.geojson"
CATALOG_MANIFEST = "manifest.json"
DATASET_CHIP_INDEX = "chips.gpkg"
"""A dataset version's spatial index of its chips (stages.chip_index)."""
SHARD_INDEX = "index.json"
"""A shard (a scene's chips) is complete once its index exists: it is written last."""


def join_key(*parts: str) -> str:
    """Join key parts with '/', dropping empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def incoming_prefix(object_type: str) -> str:
    """Where analysts drop scenes and annotations."""
    return join_key("incoming", object_type)


def catalog_prefix(object_type: str) -> str:
    """Where validated scenes live, one folder per scene."""
    return join_key("catalog", object_type, "scenes")


def catalog_scene_key(object_type: str, scene_id: str, name: str) -> str:
    """One file of a cataloged scene (:data:`CATALOG_SCENE`, ``_ANNOTATIONS``, ``_MANIFEST``)."""
    return join_key(catalog_prefix(object_type), scene_id, name)


def quarantine_prefix(object_type: str) -> str:
    """Where rejected drops go, each with its reason.json."""
    return join_key("quarantine", object_type)


def chips_prefix(object_type: str) -> str:
    """Root of the tile shards, ``<params_hash>/<scene_id>`` below it."""
    return join_key("chips", object_type)


def shard_prefix(object_type: str, params_hash: str, scene_id: str) -> str:
    """One scene's chips, labels and tile index for one set of tiling parameters."""
    return join_key(chips_prefix(object_type), params_hash, scene_id)


def hard_prefix(object_type: str) -> str:
    """Root of the mined hard chips, one folder per cycle."""
    return join_key("hard", object_type)


def hard_cycle_prefix(object_type: str, cycle_id: str) -> str:
    """One cycle's hard-chip shards (one per scene)."""
    return join_key(hard_prefix(object_type), cycle_id)


def hard_manifest_key(object_type: str, cycle_id: str) -> str:
    """One cycle's mining manifest (provenance of every hard chip)."""
    return join_key(hard_cycle_prefix(object_type, cycle_id), "manifest.json")


def datasets_prefix(object_type: str) -> str:
    """Root of the dataset versions."""
    return join_key("datasets", object_type)


def scene_splits_key(object_type: str) -> str:
    """The frozen scene -> test | val | train assignment."""
    return join_key(datasets_prefix(object_type), "splits.json")


def dataset_prefix(object_type: str, version: str) -> str:
    """One dataset version."""
    return join_key(datasets_prefix(object_type), version)


def model_run_prefix(object_type: str, run_id: str) -> str:
    """One training's outputs (weights, results, result.json)."""
    return join_key("models", object_type, run_id)


def predictions_key(object_type: str, model_version: str, scene_id: str) -> str:
    """Where a model version's detections of a scene are stored."""
    return join_key("predictions", object_type, str(model_version), f"{scene_id}.geojson")


def predictions_index_key(object_type: str, model_version: str, scene_sha256: str) -> str:
    """Index entry naming the stored predictions of a scene file, by the file's SHA-256.

    The detect DAG writes it; mining uses it to find predictions of a scene that analysts
    annotated and dropped under another name.
    """
    return join_key("predictions", object_type, str(model_version), "by-sha256",
                    f"{scene_sha256}.json")


def inference_incoming_prefix(object_type: str) -> str:
    """Where scenes to detect on are dropped."""
    return join_key("inference", "incoming", object_type)


def inference_done_prefix(object_type: str) -> str:
    """Where scenes go once their predictions are stored."""
    return join_key("inference", "done", object_type)


def report_key(object_type: str, cycle_id: str) -> str:
    """A cycle's report (JSON): history, never erased by a rerun."""
    return join_key("cycles", object_type, cycle_id, "report.json")


def report_markdown_key(object_type: str, cycle_id: str) -> str:
    """A cycle's report for people."""
    return join_key("cycles", object_type, cycle_id, "report.md")


def cycle_ingest_key(object_type: str, cycle_id: str) -> str:
    """The drops a cycle cataloged or quarantined, over all its runs (a rerun after a crash
    finds the rest of the drops, and the report still names them all)."""
    return join_key("cycles", object_type, cycle_id, "ingest.json")


def cycle_dataset_key(object_type: str, cycle_id: str) -> str:
    """The dataset version a cycle assembled: a rerun of the cycle trains on the same one."""
    return join_key("cycles", object_type, cycle_id, "dataset.json")


def cycle_timing_prefix(object_type: str, cycle_id: str) -> str:
    """How long each stage of a cycle took, one record per stage run (see cycle.timing)."""
    return join_key("cycles", object_type, cycle_id, "timing") + "/"


def cycle_timing_key(object_type: str, cycle_id: str, name: str) -> str:
    """One stage run's time, ``cycles/<type>/<cycle_id>/timing/<stage>[.<part>].json``."""
    return join_key("cycles", object_type, cycle_id, "timing", f"{name}.json")


def cycle_lock_prefix(object_type: str) -> str:
    """The generations of an object type's cycle lock: the highest names the cycle that holds
    the type (see cycle.lock)."""
    return join_key("cycles", object_type, "lock") + "/"


def cycle_lock_key(object_type: str, generation: int) -> str:
    """One generation of an object type's cycle lock, ``cycles/<type>/lock/<generation>.json``."""
    return join_key("cycles", object_type, "lock", f"{generation:010d}.json")


def cycle_state_key(object_type: str) -> str:
    """What the last trainings of an object type used (scenes, dataset version, time)."""
    return join_key("cycles", object_type, "state.json")
