"""The detect stage: run the champion over scenes dropped for inference.

Scenes (GeoTIFFs) dropped anywhere under ``inference/incoming/<type>/`` are run through one
registered model version and written to
``predictions/<type>/<model_version>/<scene_id>.geojson`` (scene CRS), where ``scene_id`` is
the file's path under the incoming folder with ``/`` turned into ``-`` and the suffix dropped.
Only after its predictions are stored is a scene moved to ``inference/done/<type>/`` (same
relative path), so a crash between the two re-detects nothing and loses nothing: a re-run
finds the predictions and just finishes the move.

Each prediction also gets an index entry keyed by the SHA-256 of the scene's pixels file
(``predictions/<type>/<version>/by-sha256/<sha>.json``). When analysts later annotate the same
file and drop it for training, the mining stage finds the champion's stored predictions through
it, whatever the drop is called, instead of detecting again.

Files that are not GeoTIFFs are left where they are. Like every stage, the functions here take
the object type's config and :class:`~retrain_lib.cycle.settings.CycleSettings` and return
typed results.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import InputError
from retrain_lib.core.io import safe_id
from retrain_lib.core.layout import (
    inference_done_prefix,
    inference_incoming_prefix,
    join_key,
    predictions_index_key,
    predictions_key,
)
from retrain_lib.core.records import Record
from retrain_lib.cycle.champion import registry, version_uri
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.geo.raster import object_storage
from retrain_lib.stages.inference import (
    DetectOptions,
    detect_scene,
    load_detector,
    write_detections,
)

__all__ = [
    "SceneDetected",
    "ServingModel",
    "detect_incoming_scene",
    "inference_scene_id",
    "list_inference_scenes",
    "serving_model",
]

log = logging.getLogger(__name__)

SCENE_SUFFIXES = (".tif", ".tiff")


class ServingModel(Record):
    """The champion a detect run serves, pinned by version."""

    model_name: str
    version: str
    model_uri: str


class SceneDetected(Record):
    """What the detect stage did with one waiting scene."""

    scene_id: str
    model_version: str
    predictions: str
    source: str
    moved_to: str
    reused: bool
    detections: int | None = None
    seconds: float | None = None


def list_inference_scenes(cfg: ObjectTypeConfig, settings: CycleSettings) -> list[str]:
    """Storage keys of the GeoTIFFs waiting under ``inference/incoming/<type>/``."""
    storage = settings.storage()
    return [k for k in storage.list(inference_incoming_prefix(cfg.name))
            if PurePosixPath(k).suffix.lower() in SCENE_SUFFIXES]


def serving_model(cfg: ObjectTypeConfig, settings: CycleSettings) -> ServingModel | None:
    """The champion to serve, pinned by version (None before the first promotion).

    A run resolves the alias once, so every scene of the run is detected by the same model even
    if a new champion is promoted meanwhile (that promotion triggers its own run).
    """
    champion = registry(cfg, settings).champion()
    if champion is None:
        return None
    return ServingModel(model_name=cfg.registered_model_name, version=champion.version,
                        model_uri=version_uri(cfg, champion.version))


def inference_scene_id(folder: str, key: str) -> str:
    """The scene id of a scene file under an inference folder (incoming or done): its path
    below the folder, ``/`` turned into ``-``, without the suffix."""
    relative = PurePosixPath(key[len(folder) + 1:])
    return safe_id(str(relative.with_suffix("")).replace("/", "-"), fallback="scene")


def detect_incoming_scene(cfg: ObjectTypeConfig, settings: CycleSettings, scene_key: str,
                          model: ServingModel) -> SceneDetected:
    """Detect objects on one waiting scene with ``model`` (from :func:`serving_model`).

    Returns the scene id, where its predictions are, how many objects were found and whether
    earlier work was reused. Idempotent: stored predictions are not computed again.

    Raises:
        InputError: the scene is not a readable, georeferenced raster.
        StorageError: storage cannot be read or written.
    """
    storage = settings.storage()
    incoming = inference_incoming_prefix(cfg.name)
    if not scene_key.startswith(incoming + "/"):
        raise InputError(f"{scene_key}: not under {incoming}/; only scenes dropped there are "
                         "detected")
    scene_id = inference_scene_id(incoming, scene_key)
    version = model.version
    key = predictions_key(cfg.name, version, scene_id)
    done_key = join_key(inference_done_prefix(cfg.name), scene_key[len(incoming) + 1:])
    where = {"scene_id": scene_id, "model_version": version, "predictions": storage.url(key),
             "source": scene_key, "moved_to": storage.url(done_key)}
    if not storage.exists(scene_key):
        # A retry after the move already happened: nothing left to do.
        return SceneDetected(**where, reused=True)
    if storage.exists(key):
        log.info("%s: predictions of v%s already stored; finishing the move", scene_id, version)
        storage.move(scene_key, done_key)
        return SceneDetected(**where, reused=True)
    scratch = settings.scratch_dir(f"detect-{cfg.name}-v{version}")
    # Read in place, window by window (on S3 through /vsis3/): never downloaded whole.
    with object_storage(settings.s3):
        detector = load_detector(model.model_uri, device=cfg.training.device,
                                 tracking_uri=settings.tracking_uri)
        options = DetectOptions(tiling=cfg.tiling, conf=cfg.mining.conf_threshold)
        detections = detect_scene(Path(storage.raster_path(scene_key)), detector, options,
                                  scene_id=scene_id)
    local = scratch / f"{scene_id}.geojson"
    write_detections(detections, local)
    # The index by content lets mining find these predictions under the name the scene
    # gets when analysts annotate it; the hash streams the object, writing nothing to disk.
    sha = storage.sha256(scene_key)
    storage.put_file(local, key)
    storage.put_json(predictions_index_key(cfg.name, version, sha),
                     {"scene_id": scene_id, "predictions": key, "source": scene_key})
    local.unlink(missing_ok=True)
    log.info("%s: %d detection(s) by v%s -> %s", scene_id, detections.stats.boxes_out,
             version, storage.url(key))
    storage.move(scene_key, done_key)
    return SceneDetected(**where, reused=False, detections=int(detections.stats.boxes_out),
                         seconds=detections.stats.seconds_total)
