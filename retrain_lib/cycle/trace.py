"""Provenance as one query: from a detection (or a model version, a dataset version or a scene)
back to the model, its training, its dataset, the chips under the detection, their scenes, the
analysts' drops and the champion it was warm-started from.

Each link is read from where the project keeps it (MLflow tags and runs, dataset cards, the
dataset's chip index, mining manifests, catalog manifests) and, where a hash was stored, checked
against it:

- a model version's ``weights_sha256`` tag against its weights file;
- a dataset version's id (a content hash) against its lists and the shard indexes it names;
- a chip's shard index and label revision against the shard and the scene's annotations;
- a cataloged scene's image hash against ``scene.tif``.

A link that fails its check is ``broken``; one whose record was deleted is ``gone``, with what is
still known from the links around it. Nothing is silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import InputError, RetrainError, StorageError
from retrain_lib.core.layout import (
    CATALOG_ANNOTATIONS,
    CATALOG_MANIFEST,
    CATALOG_SCENE,
    DATASET_CHIP_INDEX,
    SHARD_INDEX,
    catalog_prefix,
    catalog_scene_key,
    dataset_prefix,
    datasets_prefix,
    hard_manifest_key,
    inference_done_prefix,
    join_key,
)
from retrain_lib.core.records import Record
from retrain_lib.core.storage import Storage
from retrain_lib.cycle.champion import registry
from retrain_lib.cycle.history import decided_by
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.stages.chip_index import IndexedChip, query_chip_index, read_chip_index
from retrain_lib.stages.dataset import dataset_version_id
from retrain_lib.stages.registry import CHAMPION_ALIAS, ModelRegistry, ModelVersionInfo
from retrain_lib.stages.weights import WEIGHTS_SHA256_TAG

__all__ = ["LonLat", "TraceLink", "Tracer", "count_links"]

Status = Literal["ok", "broken", "gone", "unverified"]
LonLat = tuple[float, float]

RUN_PARAMS = ("epochs", "imgsz", "batch", "lr0", "optimizer", "seed", "device", "weights",
              "train_images", "val_images")
RUN_TAGS = ("code_version", "mlflow.source.git.commit", "container_image", "cycle_id",
            "candidate", "dataset_version", "parent_model_version", WEIGHTS_SHA256_TAG)


class TraceLink(Record):
    """One link of a provenance chain, with the links it leads to."""

    kind: str
    """detection, model_version, training_run, dataset, chips, chip, scene, drop, weights."""
    title: str
    status: Status = "ok"
    problem: str = ""
    """What is broken or gone, and what is still known."""
    details: dict[str, Any] = Field(default_factory=dict)
    children: list[TraceLink] = Field(default_factory=list)


def count_links(link: TraceLink) -> Counter[str]:
    """How many links of the chain have each status."""
    counts: Counter[str] = Counter({link.status: 1})
    for child in link.children:
        counts.update(count_links(child))
    return counts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tracer:
    """Follows the chain for one object type.

    Args:
        cfg: The object type.
        settings: Its storage and MLflow.
        ancestors: How many warm-start parents to follow (0: none).
        radius_m: Chips within this distance of the detection count as near (0: covering it).
        verify: Check stored hashes (scenes are hashed whole: on S3 they are streamed).
        max_chips: Chips listed per dataset (the rest are counted).
    """

    def __init__(self, cfg: ObjectTypeConfig, settings: CycleSettings, *, ancestors: int = 1,
                 radius_m: float = 0.0, verify: bool = True, max_chips: int = 20) -> None:
        self.cfg, self.settings = cfg, settings
        self.ancestors, self.radius_m = ancestors, radius_m
        self.verify, self.max_chips = verify, max_chips
        self._scenes: dict[str, TraceLink] = {}
        self._hashes: dict[str, str] = {}

    @cached_property
    def storage(self) -> Storage:
        """The storage root."""
        return self.settings.storage()

    @cached_property
    def registry(self) -> ModelRegistry:
        """The object type's registered model."""
        return registry(self.cfg, self.settings)

    # -- starting points -----------------------------------------------------------------

    def detection(self, file: str, *, feature: int | None = None,
                  at: tuple[float, float] | None = None, at_crs: str | None = None
                  ) -> TraceLink:
        """Trace one detection of a predictions file (GeoJSON or GeoPackage, a local path or a
        key under the storage root), chosen by index or by a point on the map.

        Raises:
            InputError: no such file or feature, a point outside the scene or on no detection.
        """
        from retrain_lib.geo.crs import WGS84, reproject_geometries, to_crs

        with self._predictions_file(file) as (local, shown):
            geoms, props, crs = _read_predictions(local, shown)
        if feature is None and at is None:
            raise InputError(f"{shown}: say which detection: --feature N or --at X,Y")
        if feature is not None:
            if not 0 <= feature < len(geoms):
                raise InputError(f"{shown}: no feature {feature}; it holds {len(geoms)} "
                                 f"detection(s), numbered from 0")
            index = feature
        else:
            assert at is not None
            index = self._feature_at(shown, geoms, props, crs, at, to_crs(at_crs or crs))
        geom, prop = geoms[index], props[index]
        centre = reproject_geometries(geom.centroid, crs, WGS84)
        location = (round(float(centre.x), 7), round(float(centre.y), 7))
        link = TraceLink(kind="detection", title=(
            f"detection {index} of {shown}: {prop.get('class', '?')} "
            f"score {float(prop.get('score', 0.0)):.3f}"), details={
                "file": shown, "feature": index, "scene_id": prop.get("scene_id", ""),
                "class": prop.get("class", ""), "score": prop.get("score"),
                "model": prop.get("model", ""), "model_version": prop.get("model_version", ""),
                "centre_lonlat": list(location), "bounds": [round(v, 3) for v in geom.bounds]})
        model, version = str(prop.get("model", "")), str(prop.get("model_version", ""))
        if model and model != self.cfg.registered_model_name:
            raise InputError(f"{shown}: feature {index} was detected by model {model!r}, not by "
                             f"{self.cfg.registered_model_name!r} of type {self.cfg.name}")
        if not version.isdigit():
            link.children.append(TraceLink(
                kind="model_version", status="unverified",
                title=f"weights {version or '(unnamed)'}: not a registered version",
                problem="the detection names weights by their hash, not a registered version: "
                        "the registry holds no lineage for them"))
            return link
        link.children.append(self._version_link(version, location, self.ancestors,
                                                 starting=False))
        return link

    def model_version(self, target: str, *, location: LonLat | None = None) -> TraceLink:
        """Trace a version: ``3``, ``v3``, ``@champion``, ``models:/<name>/3`` or
        ``models:/<name>@champion``.

        Raises:
            InputError: the name is not this type's model, or the version or alias is unknown.
        """
        return self._version_link(self._version_number(target), location, self.ancestors,
                                  starting=True)

    def dataset(self, version: str, *, location: LonLat | None = None) -> TraceLink:
        """Trace a dataset version (``ds-…``), and the models trained on it.

        Raises:
            InputError: no such dataset version.
        """
        if not self.storage.exists(join_key(dataset_prefix(self.cfg.name, version),
                                            "card.json")):
            known = [d for d in self.storage.list_children(datasets_prefix(self.cfg.name) + "/")
                     if d.startswith("ds-")]
            raise InputError(f"no dataset version {version!r} of {self.cfg.name} in "
                             f"{self.storage.url(datasets_prefix(self.cfg.name))}; versions: "
                             f"{', '.join(sorted(known)) or 'none'}")
        link = self._dataset_link(version, location)
        trained = [v for v in self.registry.list_versions()
                   if v.tags.get("dataset_version") == version]
        link.details["trained_versions"] = [v.version for v in trained]
        return link

    def scene(self, scene_id: str) -> TraceLink:
        """Trace a cataloged scene: its drop, and the dataset versions and models it fed.

        Raises:
            InputError: no such scene in the catalog.
        """
        if not self.storage.exists(catalog_scene_key(self.cfg.name, scene_id, CATALOG_MANIFEST)):
            raise InputError(f"no scene {scene_id!r} in the catalog of {self.cfg.name} "
                             f"({self.storage.url(catalog_prefix(self.cfg.name))})")
        link = self._scene_link(scene_id)
        used = []
        for version in sorted(self.storage.list_children(datasets_prefix(self.cfg.name) + "/")):
            card_key = join_key(dataset_prefix(self.cfg.name, version), "card.json")
            if version.startswith("ds-") and self.storage.exists(card_key):
                card = self.storage.get_json(card_key)
                if scene_id in card.get("chips_per_scene", {}) or \
                        scene_id in card.get("test_scenes", []):
                    used.append(version)
        models = [v.version for v in self.registry.list_versions()
                  if v.tags.get("dataset_version") in used]
        link.details.update(dataset_versions=used, model_versions=models)
        return link

    # -- links -----------------------------------------------------------------------------

    def _version_number(self, target: str) -> str:
        from retrain_lib.stages.weights import parse_models_uri

        name, alias, version = self.cfg.registered_model_name, None, None
        text = target.strip()
        if text.startswith("models:/"):
            name, alias, version = parse_models_uri(text)
        elif text.startswith("@"):
            alias = text[1:]
        elif text.lstrip("v").isdigit():
            version = text.lstrip("v")
        else:
            raise InputError(f"{target!r}: not a model version; give 3, v3, @champion, "
                             "models:/<name>/3 or models:/<name>@champion")
        if name != self.cfg.registered_model_name:
            raise InputError(f"{target}: model {name!r} is not {self.cfg.name}'s model "
                             f"({self.cfg.registered_model_name!r})")
        if alias is not None:
            info = self.registry.champion() if alias == CHAMPION_ALIAS else None
            if info is None:
                raise InputError(f"model {name!r} has no version with alias @{alias}")
            return info.version
        assert version is not None
        try:
            return self.registry.get_version(version).version
        except RetrainError as exc:
            raise InputError(str(exc)) from None

    def _version_link(self, version: str, location: LonLat | None, ancestors: int, *,
                      starting: bool) -> TraceLink:
        name = self.registry.model_name
        try:
            info = self.registry.get_version(version)
        except RetrainError:
            if starting:
                raise
            return TraceLink(kind="model_version", status="gone",
                             title=f"model version {version} of {name}",
                             problem=f"version {version} is no longer in the registry at "
                                     f"{self.registry.tracking_uri} (deleted?); still known: "
                                     "the detections it made name it")
        tags = info.tags
        decision = tags.get("decision", "") or "undecided"
        link = TraceLink(kind="model_version", title=(
            f"model version {version} of {name}: {decision}"
            + (f" (aliases: {', '.join(info.aliases)})" if info.aliases else "")), details={
                "version": version, "aliases": list(info.aliases),
                "registered_at": tags.get("registered_at", info.created.isoformat()),
                "cycle_id": tags.get("cycle_id", ""), "candidate": tags.get("candidate", ""),
                "decision": decision, "decision_reason": tags.get("decision_reason", ""),
                "decided_at": tags.get(f"{decision}_at", ""),
                "decided_by": decided_by(tags),
                "replaced_version": tags.get("replaced_version", ""),
                "metrics": info.metrics, "dataset_version": tags.get("dataset_version", ""),
                "parent_version": info.parent or ""})
        link.children.append(self._weights_link(info))
        link.children.append(self._run_link(info))
        dataset = tags.get("dataset_version", "")
        if dataset:
            link.children.append(self._dataset_link(dataset, location))
        else:
            link.children.append(TraceLink(kind="dataset", status="unverified",
                                           title="dataset: none recorded",
                                           problem="the version carries no dataset_version tag"))
        parent = info.parent
        if parent and ancestors > 0:
            warm = self._version_link(parent, location, ancestors - 1, starting=False)
            link.children.append(warm.model_copy(update={
                "title": "warm-started from " + warm.title}))
        elif parent:
            link.children.append(TraceLink(kind="model_version",
                                           title=f"warm-started from version {parent} "
                                                 "(not followed: --ancestors)"))
        return link

    def _weights_link(self, info: ModelVersionInfo) -> TraceLink:
        recorded = info.tags.get(WEIGHTS_SHA256_TAG, "")
        title = f"weights of version {info.version}"
        if not recorded:
            return TraceLink(kind="weights", status="unverified", title=title, problem=(
                "no weights digest recorded (registered before digests were kept)"))
        if not self.verify:
            return TraceLink(kind="weights", status="unverified", title=title,
                             details={"sha256": recorded}, problem="not checked (--no-verify)")
        from retrain_lib.core.io import file_sha256
        from retrain_lib.stages.weights import resolve_model

        try:
            ref = resolve_model(f"models:/{self.registry.model_name}/{info.version}",
                                tracking_uri=self.registry.tracking_uri)
        except InputError as exc:
            return TraceLink(kind="weights", status="gone", title=title,
                             details={"sha256": recorded},
                             problem=f"the weights cannot be fetched ({exc}); the digest "
                                     "recorded at registration is still known")
        actual = file_sha256(ref.weights)
        if actual != recorded:
            return TraceLink(kind="weights", status="broken", title=title,
                             details={"sha256": recorded, "found": actual},
                             problem=f"the weights file hashes to {actual[:12]}…, not to the "
                                     f"{recorded[:12]}… recorded at registration")
        return TraceLink(kind="weights", title=f"{title}: sha256 {recorded[:12]}… (checked)",
                         details={"sha256": recorded})

    def _run_link(self, info: ModelVersionInfo) -> TraceLink:
        from mlflow.exceptions import MlflowException

        from retrain_lib.stages.mlflow_server import mlflow_errors

        title = f"training run {info.run_id}"
        try:
            with mlflow_errors(f"reading training run {info.run_id}",
                               self.registry.tracking_uri):
                run = self.registry.client.get_run(info.run_id)
        except MlflowException:
            return TraceLink(kind="training_run", status="gone", title=title,
                             problem="the MLflow run is gone; still known from the version: "
                                     f"dataset {info.tags.get('dataset_version', '?')}, "
                                     f"cycle {info.tags.get('cycle_id', '?')}")
        params, tags = run.data.params or {}, run.data.tags or {}
        details = {
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "started_ms": run.info.start_time,
            "ended_ms": run.info.end_time,
            "params": {k: params[k] for k in RUN_PARAMS if k in params},
            "tags": {k: tags[k] for k in RUN_TAGS if tags.get(k)},
            "final_metrics": {k[len("final/"):]: v for k, v in (run.data.metrics or {}).items()
                              if k.startswith("final/")},
        }
        stage = run.info.lifecycle_stage
        status: Status = "ok" if stage == "active" else "gone"
        where = tags.get("container_image") or "a local process"
        return TraceLink(kind="training_run", status=status, details=details,
                         title=f"{title} ({params.get('epochs', '?')} epoch(s), imgsz "
                               f"{params.get('imgsz', '?')}, code {tags.get('code_version', '?')}"
                               f", in {where})",
                         problem="" if status == "ok" else f"the MLflow run is {stage}")

    def _dataset_link(self, version: str, location: LonLat | None) -> TraceLink:
        prefix = dataset_prefix(self.cfg.name, version)
        card_key = join_key(prefix, "card.json")
        if not self.storage.exists(card_key):
            return TraceLink(kind="dataset", status="gone", title=f"dataset {version}",
                             problem=f"{self.storage.url(prefix)}/ is not in storage (deleted by "
                                     "hand?); still known: the model versions that name it")
        card = self.storage.get_json(card_key)
        train = card.get("train", {})
        details = {
            "version": version, "cycle_id": card.get("cycle_id", ""),
            "created_at": card.get("created_at", ""),
            "parent_version": card.get("parent_version", ""),
            "train_images": train.get("chips"), "val_images": card.get("val", {}).get("chips"),
            "instances_per_class": train.get("instances", {}),
            "chips_per_region": train.get("regions", {}),
            "hard_chips": train.get("hard_chips", 0),
            "hard_by_reason": card.get("hard_by_reason", {}),
            "test_scenes": card.get("test_scenes", []),
        }
        link = TraceLink(kind="dataset", details=details, title=(
            f"dataset {version} (cycle {card.get('cycle_id') or '-'}): "
            f"{train.get('chips', '?')} training entries, {train.get('hard_chips', 0)} hard"))
        index_key = join_key(prefix, DATASET_CHIP_INDEX)
        if not self.storage.exists(index_key):
            problem = self._check_dataset(version, prefix, card, None)
            link.children.append(TraceLink(kind="chips", status="unverified",
                                           title="chips: no chip index",
                                           problem="assembled before chip indexes were kept: "
                                                   "the chips under a location are not known"))
        else:
            # One download serves the check (the shard hashes) and the lookup by place.
            with self._fetched(index_key) as local:
                shards = ({c.shard_sha256 for c in read_chip_index(local)} if self.verify
                          else set())
                problem = self._check_dataset(version, prefix, card, shards)
                if location is not None:
                    link.children.append(self._chips_link(version, local, location))
        if problem:
            link = link.model_copy(update={"status": "broken", "problem": problem})
        return link

    @contextmanager
    def _fetched(self, key: str) -> Iterator[Path]:
        with self.storage.local_copy(key, self.settings.scratch_dir("trace")) as local:
            yield local

    def _object_sha256(self, key: str) -> str:
        """SHA-256 of a stored object, computed once per trace (chips share shards and
        scenes)."""
        if key not in self._hashes:
            self._hashes[key] = self.storage.sha256(key)
        return self._hashes[key]

    def _check_dataset(self, version: str, prefix: str, card: dict[str, Any],
                       shards: set[str] | None) -> str:
        """Why the version's lists no longer hash to its id ('' when they do); ``shards``:
        the shard hashes its chip index recorded (None: no index)."""
        if not self.verify:
            return ""
        try:
            lists = {name: [posixpath.normpath(join_key(prefix, line.strip()))
                            for line in self.storage.get_bytes(join_key(prefix, name))
                            .decode().splitlines() if line.strip()]
                     for name in ("train.txt", "val.txt")}
            test = self.storage.get_json(join_key(prefix, "test_scenes.json"))["scenes"]
        except (StorageError, KeyError, ValueError) as exc:
            return f"its lists cannot be read ({exc})"
        if shards is None:  # an older version: hash the shard indexes it names now
            prefixes = {posixpath.dirname(posixpath.dirname(k))
                        for k in lists["train.txt"] + lists["val.txt"]}
            shards = {self._object_sha256(join_key(p, SHARD_INDEX))
                      for p in prefixes if self.storage.exists(join_key(p, SHARD_INDEX))}
        found = dataset_version_id(card.get("classes", self.cfg.classes), lists["train.txt"],
                                   lists["val.txt"], test, shards)
        if found != version:
            return (f"its train.txt, val.txt and test_scenes.json hash to {found}, not to "
                    f"{version}: the lists were changed after assembly")
        return ""

    def _chips_link(self, version: str, index: Path, location: LonLat) -> TraceLink:
        near = query_chip_index(index, *location, radius_m=self.radius_m)
        where = (f"within {self.radius_m:g} m of" if self.radius_m else "covering")
        link = TraceLink(kind="chips", title=(
            f"{len(near)} chip(s) of {version} {where} ({location[0]:.6f}, {location[1]:.6f})"),
            details={"lonlat": list(location), "radius_m": self.radius_m, "count": len(near)})
        for chip in near[:self.max_chips]:
            link.children.append(self._chip_link(chip))
        if len(near) > self.max_chips:
            link.details["not_listed"] = len(near) - self.max_chips
        return link

    def _chip_link(self, chip: IndexedChip) -> TraceLink:
        kind = "regular"
        details: dict[str, Any] = {
            "image": chip.image_key, "scene_id": chip.scene_id, "region": chip.region,
            "split": chip.split, "source": chip.source, "repeats": chip.repeats,
            "bounds_lonlat": list(chip.bounds_lonlat),
            "label_revision": chip.labels_sha256[:12]}
        if chip.source == "hard":
            kind = f"hard {chip.reason.replace('_', ' ')} mined in cycle {chip.mining_cycle}"
            details.update(reason=chip.reason, mining_cycle=chip.mining_cycle,
                           mined_with_version=self._mining_version(chip.mining_cycle))
        problems = []
        if self.verify:
            index_key = join_key(chip.shard_prefix, SHARD_INDEX)
            if not self.storage.exists(index_key):
                problems.append(f"its shard {self.storage.url(chip.shard_prefix)} is gone")
            elif self._object_sha256(index_key) != chip.shard_sha256:
                problems.append(f"its shard index {self.storage.url(index_key)} changed after "
                                "the dataset was assembled")
            labels = catalog_scene_key(self.cfg.name, chip.scene_id, CATALOG_ANNOTATIONS)
            if chip.labels_sha256 and self.storage.exists(labels):
                details["label_revision_is_current"] = \
                    self._object_sha256(labels) == chip.labels_sha256
        link = TraceLink(kind="chip", title=(
            f"{kind} chip {posixpath.basename(chip.image_key)} of {chip.scene_id} ({chip.split}"
            f", ×{chip.repeats})"), details=details,
            status="broken" if problems else "ok", problem="; ".join(problems))
        link.children.append(self._scene_link(chip.scene_id))
        return link

    def _mining_version(self, cycle: str) -> str:
        key = hard_manifest_key(self.cfg.name, cycle)
        if not cycle or not self.storage.exists(key):
            return ""
        return str(self.storage.get_json(key).get("model_version", ""))

    def _scene_link(self, scene_id: str) -> TraceLink:
        if scene_id in self._scenes:  # a scene under several chips is checked once
            return self._scenes[scene_id]
        manifest_key = catalog_scene_key(self.cfg.name, scene_id, CATALOG_MANIFEST)
        if not self.storage.exists(manifest_key):
            link = TraceLink(kind="scene", status="gone", title=f"scene {scene_id}",
                             problem=f"{self.storage.url(manifest_key)} is gone; still known: "
                                     "its chips and their shard")
            self._scenes[scene_id] = link
            return link
        raw = self.storage.get_bytes(manifest_key)
        manifest = json.loads(raw)
        cog = manifest.get("cog") or {}
        expected = (cog.get("scene_tif_sha256") if cog.get("converted")
                    else manifest.get("scene_sha256"))
        status: Status = "ok"
        problem = ""
        scene_key = catalog_scene_key(self.cfg.name, scene_id, CATALOG_SCENE)
        if not self.verify:
            status, problem = "unverified", "image hash not checked (--no-verify)"
        elif not self.storage.exists(scene_key):
            status, problem = "gone", f"{self.storage.url(scene_key)} is gone"
        elif expected and self._object_sha256(scene_key) != expected:
            status, problem = "broken", (f"{self.storage.url(scene_key)} does not hash to the "
                                         f"{expected[:12]}… its manifest recorded at ingest")
        checked = ", image hash checked" if status == "ok" and expected else ""
        link = TraceLink(kind="scene", status=status, problem=problem, title=(
            f"scene {scene_id} ({manifest.get('region') or 'no region'}, "
            f"{manifest.get('width')}×{manifest.get('height')} px, "
            f"{manifest.get('objects', 0)} annotated objects{checked})"), details={
                "scene_id": scene_id, "region": manifest.get("region", ""),
                "crs": manifest.get("crs", ""), "gsd_m": manifest.get("gsd_m"),
                "scene_sha256": manifest.get("scene_sha256", ""),
                "image": self.storage.url(scene_key)})
        link.children.append(TraceLink(kind="drop", title=(
            f"drop {manifest.get('drop_id', '?')}: {manifest.get('source_scene', '?')} + "
            f"{manifest.get('source_annotations', '?')}, cataloged "
            f"{manifest.get('ingested_at', '?')} by cycle {manifest.get('cycle_id') or '-'}"),
            details={"drop_id": manifest.get("drop_id", ""),
                     "ingested_at": manifest.get("ingested_at", ""),
                     "cycle_id": manifest.get("cycle_id", ""),
                     "source": manifest.get("source", ""),
                     "notes": manifest.get("drop_notes", ""),
                     "files": [manifest.get("source_scene"), manifest.get("source_annotations")],
                     "manifest_sha256": _sha256(raw)}))
        self._scenes[scene_id] = link
        return link

    # -- the detection's file ----------------------------------------------------------------

    @contextmanager
    def _predictions_file(self, file: str) -> Iterator[tuple[Path, str]]:
        local = Path(file)
        if local.is_file():
            yield local, file
            return
        key = file.strip("/")
        exists = False
        try:
            exists = bool(key) and not file.startswith(("/", "s3://")) and \
                self.storage.exists(key)
        except StorageError:
            exists = False
        if not exists:
            raise InputError(f"{file}: no such file (neither a local file nor a key under "
                             f"{self.storage.uri})")
        with self._fetched(key) as fetched:
            yield fetched, self.storage.url(key)

    def _feature_at(self, shown: str, geoms: Sequence[Any], props: Sequence[dict[str, Any]],
                    crs: Any, at: tuple[float, float], at_crs: Any) -> int:
        import shapely

        from retrain_lib.geo.crs import reproject_geometries

        point = reproject_geometries(shapely.Point(at), at_crs, crs)
        inside = [i for i, g in enumerate(geoms) if g.covers(point)]
        if inside:
            return max(inside, key=lambda i: float(props[i].get("score", 0.0)))
        scene = str(props[0].get("scene_id", "")) if props else ""
        footprint = self._scene_footprint(scene, crs)
        if footprint is not None and not footprint.covers(point):
            raise InputError(f"{shown}: the point ({at[0]}, {at[1]}) is outside scene {scene} "
                             f"(bounds {', '.join(f'{v:.2f}' for v in footprint.bounds)} in the "
                             "file's CRS)")
        if not geoms:
            raise InputError(f"{shown}: holds no detection")
        nearest = min(range(len(geoms)), key=lambda i: geoms[i].distance(point))
        raise InputError(f"{shown}: no detection at ({at[0]}, {at[1]}); the nearest is feature "
                         f"{nearest}, {geoms[nearest].distance(point):.1f} map units away")

    def _scene_footprint(self, scene_id: str, crs: Any) -> Any:
        """The scene's outline in ``crs`` from its catalog manifest or its raster (None when
        neither is found)."""
        import shapely
        from affine import Affine

        from retrain_lib.geo.crs import pixel_to_map, reproject_geometries

        if not scene_id:
            return None
        key = catalog_scene_key(self.cfg.name, scene_id, CATALOG_MANIFEST)
        if self.storage.exists(key):
            m = self.storage.get_json(key)
            outline = pixel_to_map(shapely.box(0, 0, m["width"], m["height"]),
                                   Affine(*m["transform"]))
            return reproject_geometries(outline, m["crs"], crs)
        from retrain_lib.cycle.detect import inference_scene_id
        from retrain_lib.geo.raster import object_storage, open_raster

        done = inference_done_prefix(self.cfg.name)
        for raster in self.storage.list(done):
            if inference_scene_id(done, raster) == scene_id:
                with object_storage(self.settings.s3), \
                        open_raster(self.storage.raster_path(raster)) as dataset:
                    outline = shapely.box(*dataset.bounds)
                    return reproject_geometries(outline, dataset.crs, crs)
        return None


def _read_predictions(local: Path, shown: str) -> tuple[list[Any], list[dict[str, Any]], Any]:
    """Geometries, properties and CRS of a predictions file (GeoJSON or GeoPackage)."""
    if local.suffix.lower() == ".gpkg":
        import shapely
        from pyogrio.errors import DataLayerError, DataSourceError
        from pyogrio.raw import read

        try:
            meta, _, geoms, data = read(str(local))
        except (DataSourceError, DataLayerError) as exc:
            raise InputError(f"{shown}: not a readable GeoPackage ({exc})") from None
        names = list(meta["fields"])
        props = [{n: (v.item() if hasattr(v, "item") else v)
                  for n, v in zip(names, (col[i] for col in data), strict=True)}
                 for i in range(len(geoms))]
        return list(shapely.from_wkb(geoms)), props, meta["crs"]
    from retrain_lib.geo.geojson import read_geojson

    try:
        features, crs = read_geojson(local)
    except InputError as exc:
        raise InputError(str(exc).replace(str(local), shown)) from None
    return [f.geometry for f in features], [dict(f.properties) for f in features], crs
