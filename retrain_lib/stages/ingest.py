"""Ingest analysts' drops: validate, catalog the good ones, quarantine the bad ones.

A drop is one folder ``incoming/<type>/<drop_id>/`` holding ``<stem>.tif`` (or ``.tiff``)
scenes, each with a ``<stem>.geojson`` (or ``.json``) annotation file of the same stem, and
optionally ``drop.json`` with metadata (``region``, ``source``, ``notes``).

A drop is the unit an analyst submits, so it is accepted or rejected whole:

- **Good drop**: each scene goes to ``catalog/<type>/scenes/<scene_id>/`` as ``scene.tif``,
  ``annotations.geojson`` (class names normalised, geometries in the scene CRS, invalid ones
  repaired) and ``manifest.json``, published last, so a scene is cataloged exactly when its
  manifest exists. Only then are the drop's files deleted from ``incoming/``. ``scene.tif`` is
  a Cloud Optimized GeoTIFF, so later stages read windows of it in place (from S3 too): a scene
  that is not one is converted (losslessly: same pixels, internal tiles, overviews), and the
  analyst's file is kept untouched beside it as ``source.tif``; the manifest says which.
- **Bad drop**: ``reason.json`` naming every problem (file, feature, what was expected) is
  written into ``quarantine/<type>/<drop_id>/``, the drop's files are copied beside it
  untouched, and only then deleted from ``incoming/``.

Every step is idempotent: a re-run after a crash finds finished manifests and skips their
copies, so a drop is never lost and never cataloged twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass as pydantic_dataclass

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.core.errors import InputError, RetrainError, StorageError
from retrain_lib.core.io import file_sha256, safe_id
from retrain_lib.core.layout import (
    CATALOG_ANNOTATIONS,
    CATALOG_MANIFEST,
    CATALOG_SCENE,
    CATALOG_SOURCE_SCENE,
    catalog_prefix,
    incoming_prefix,
    join_key,
    quarantine_prefix,
)
from retrain_lib.core.storage import Storage

__all__ = [
    "DropOutcome",
    "IngestReport",
    "Problem",
    "count_pending_annotations",
    "ingest_drop",
    "ingest_drops",
    "list_catalog_scenes",
    "list_drops",
    "list_empty_drops",
    "list_unusable_drops",
    "usable_drop_id",
]

SCENE_SUFFIXES = (".tif", ".tiff")
LABEL_SUFFIXES = (".geojson", ".json")
DROP_METADATA = "drop.json"
DROP_METADATA_KEYS = frozenset({"region", "source", "notes"})


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Problem:
    """One reason a drop was rejected: the file in the drop, and what is wrong with it."""

    file: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form, as reason.json records it."""
        return {"file": self.file, "problem": self.problem}


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DropOutcome:
    """What happened to one drop (also what a cycle's report records of it)."""

    drop_id: str
    status: Literal["cataloged", "quarantined", "waiting", "ignored"]
    scene_ids: tuple[str, ...] = ()
    annotations: int = 0
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()
    location: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"drop_id": self.drop_id, "status": self.status,
                "scene_ids": list(self.scene_ids), "annotations": self.annotations,
                "problems": [p.to_dict() for p in self.problems], "notes": list(self.notes),
                "location": self.location}


@dataclass(frozen=True)
class IngestReport:
    """All drops of one ingest run."""

    object_type: str
    outcomes: tuple[DropOutcome, ...] = field(default_factory=tuple)

    @property
    def cataloged(self) -> tuple[DropOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "cataloged")

    @property
    def quarantined(self) -> tuple[DropOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "quarantined")

    @property
    def waiting(self) -> tuple[DropOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "waiting")

    @property
    def scene_ids(self) -> list[str]:
        return [s for o in self.cataloged for s in o.scene_ids]

    def to_dict(self) -> dict[str, Any]:
        return {"object_type": self.object_type,
                "cataloged": len(self.cataloged), "quarantined": len(self.quarantined),
                "waiting": len(self.waiting),
                "scene_ids": self.scene_ids,
                "new_annotations": sum(o.annotations for o in self.cataloged),
                "drops": [o.to_dict() for o in self.outcomes]}


def list_drops(storage: Storage, object_type: str) -> list[str]:
    """Drop ids waiting in ``incoming/<type>/``, oldest name first.

    A drop folder that is a symbolic link is listed too (ingest quarantines it, unfollowed).
    """
    prefix = incoming_prefix(object_type)
    linked = {key[len(prefix) + 1:] for key in storage.links(prefix)}
    if "" in linked:  # the type's folder itself, or one above it
        raise StorageError(f"{storage.url(prefix)}: a symbolic link is on the way to it; links "
                           "are never followed: make it a real folder in the storage root")
    drops = {d for d in storage.list_children(prefix) if usable_drop_id(d)
             and d not in linked and not storage.exists(join_key(prefix, d))}  # a stray file
    return sorted(drops | {d for d in linked if "/" not in d and d})


def usable_drop_id(drop_id: str) -> bool:
    """Whether a folder name can be a drop id: a key part that stays in its folder (not
    ``.`` or ``..``, no backslash or NUL) and fits a file name (at most 255 bytes)."""
    return (drop_id not in ("", ".", "..") and "\\" not in drop_id and "\x00" not in drop_id
            and len(drop_id.encode("utf-8")) <= 255)


def _stays_in_folder(key: str) -> bool:
    """Whether a listed key stays in its folder (no ``.`` or ``..`` part)."""
    return not any(part in (".", "..") for part in key.split("/"))


def list_unusable_drops(storage: Storage, object_type: str) -> list[str]:
    """Folder names in ``incoming/<type>/`` that cannot be drop ids: left where they are,
    never read, and reported (see :func:`usable_drop_id`)."""
    return [d for d in storage.list_children(incoming_prefix(object_type))
            if not usable_drop_id(d)]


def list_empty_drops(storage: Storage, object_type: str, now: float | None = None
                     ) -> dict[str, float]:
    """Drop folders in ``incoming/<type>/`` that hold no file yet, with their age in hours
    (an upload in progress, or a folder made and forgotten)."""
    now = time.time() if now is None else now
    return {drop_id: max(0.0, (now - changed) / 3600) for drop_id, changed in
            storage.empty_folders(incoming_prefix(object_type)).items()}


def _empty_drop(storage: Storage, cfg: ObjectTypeConfig, drop_id: str, age_h: float,
                cycle_id: str) -> DropOutcome:
    base = join_key(incoming_prefix(cfg.name), drop_id)
    finished = _finish_interrupted(storage, cfg.name, drop_id, base, [])
    if finished is not None:  # emptied by a run stopped just before it was done
        return finished
    limit = cfg.ingest.empty_drop_quarantine_hours
    if limit is None or age_h < limit:
        later = f"; quarantined if still empty after {limit:g} h" if limit is not None else ""
        return DropOutcome(drop_id, "waiting", notes=(
            f"drop {drop_id} is empty ({age_h:.1f} h old); waiting for files{later}",))
    outcome = _quarantine(storage, cfg.name, drop_id, base, [], [Problem(
        ".", f"the drop folder has been empty for {age_h:.1f} h (limit {limit:g} h, "
        "ingest.empty_drop_quarantine_hours); expected <stem>.tif scenes with their "
        "<stem>.geojson annotations")], [], {}, cycle_id)
    storage.remove_empty_folder(base)
    return outcome


def list_catalog_scenes(storage: Storage, object_type: str) -> list[dict[str, Any]]:
    """Manifests of every cataloged scene (a scene exists once its manifest does)."""
    prefix = catalog_prefix(object_type)
    manifests = []
    for scene_id in storage.list_children(prefix):
        key = join_key(prefix, scene_id, CATALOG_MANIFEST)
        if storage.exists(key):
            manifests.append(storage.get_json(key))
    return manifests


def count_pending_annotations(storage: Storage, object_type: str) -> dict[str, int]:
    """Annotated objects per waiting drop (unreadable files count 0; ingest will say why)."""
    counts: dict[str, int] = {}
    for drop_id in list_drops(storage, object_type):
        total = 0
        for key in storage.list(join_key(incoming_prefix(object_type), drop_id)):
            if PurePosixPath(key).suffix.lower() in LABEL_SUFFIXES and \
                    PurePosixPath(key).name != DROP_METADATA:
                try:
                    doc = json.loads(storage.get_bytes(key))
                    total += len(doc.get("features") or []) if isinstance(doc, dict) else 0
                except (ValueError, RetrainError):
                    continue
        counts[drop_id] = total
    return counts


def _scene_id(drop_id: str, stem: str) -> str:
    return safe_id(f"{drop_id}-{stem}")


@dataclass(frozen=True)
class _Pair:
    stem: str
    scene_key: str
    labels_key: str | None


def _pair_files(keys: Sequence[str], base: str) -> tuple[list[_Pair], list[Problem], bool]:
    scenes: dict[str, str] = {}
    labels: dict[str, str] = {}
    problems: list[Problem] = []
    has_metadata = False
    for key in keys:
        path = PurePosixPath(key)
        relative = key[len(base) + 1:]
        if "/" in relative:
            problems.append(Problem(relative, "sub-folders are not allowed in a drop; expected "
                                    "<stem>.tif + <stem>.geojson pairs at the top level"))
        elif path.name == DROP_METADATA:
            has_metadata = True
        elif path.suffix.lower() in SCENE_SUFFIXES:
            scenes[path.stem] = key
        elif path.suffix.lower() in LABEL_SUFFIXES:
            labels[path.stem] = key
        else:
            problems.append(Problem(relative, "unexpected file; a drop holds <stem>.tif scenes, "
                                    "<stem>.geojson annotations and optionally drop.json"))
    pairs = []
    for stem in sorted(scenes):
        if stem not in labels:
            problems.append(Problem(PurePosixPath(scenes[stem]).name,
                                    f"no annotation file; expected {stem}.geojson beside it "
                                    "(an empty FeatureCollection if the scene has no objects)"))
        pairs.append(_Pair(stem, scenes[stem], labels.get(stem)))
    for stem in sorted(set(labels) - set(scenes)):
        problems.append(Problem(PurePosixPath(labels[stem]).name,
                                f"annotations without a scene; expected {stem}.tif beside it"))
    if not scenes and not problems:
        problems.append(Problem(".", "the drop holds no scene; expected <stem>.tif files"))
    return pairs, problems, has_metadata


def _read_metadata(storage: Storage, key: str) -> tuple[dict[str, str], list[Problem]]:
    try:
        doc = json.loads(storage.get_bytes(key))
    except ValueError as exc:
        return {}, [Problem(DROP_METADATA, f"not valid JSON ({exc})")]
    if not isinstance(doc, dict):
        return {}, [Problem(DROP_METADATA, "expected a JSON object")]
    unknown = sorted(set(doc) - DROP_METADATA_KEYS)
    if unknown:
        return {}, [Problem(DROP_METADATA, f"unknown key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(sorted(DROP_METADATA_KEYS))}")]
    bad = sorted(k for k, v in doc.items() if not isinstance(v, str))
    if bad:
        return {}, [Problem(DROP_METADATA, f"{', '.join(bad)} must be text")]
    return dict(doc), []


@dataclass(frozen=True)
class _ValidScene:
    pair: _Pair
    scene_id: str
    manifest: dict[str, Any]
    labels_path: Path
    scene_path: Path
    cog_path: Path
    """``scene_path`` itself when it is a COG already, else its conversion."""


def _validate_scene(pair: _Pair, local_scene: Path, local_labels: Path,
                    cfg: ObjectTypeConfig, drop_id: str, out_dir: Path
                    ) -> tuple[_ValidScene | None, list[Problem], list[str]]:
    from retrain_lib.geo.annotations import load_annotations
    from retrain_lib.geo.crs import pixel_to_map
    from retrain_lib.geo.geojson import Feature, write_geojson
    from retrain_lib.geo.raster import as_cog, inspect_scene, probe_pixels

    scene_name = PurePosixPath(pair.scene_key).name
    labels_name = PurePosixPath(pair.labels_key or "").name
    scene_id = _scene_id(drop_id, pair.stem)
    try:
        scene = inspect_scene(local_scene, scene_id)
        probe_pixels(local_scene)
    except InputError as exc:
        return None, [Problem(scene_name, _strip_path(str(exc), local_scene))], []
    try:
        objects = load_annotations(local_labels, scene, cfg.class_mapper)
    except InputError as exc:
        message = _strip_path(_strip_path(str(exc), local_labels), local_scene)
        return None, [Problem(labels_name, message)], []
    problems = [Problem(labels_name, r) for r in objects.rejected]
    notes = [f"{labels_name}: {n}" for n in objects.notes if "outside the scene" not in n]
    outside = [n for n in objects.notes if "outside the scene" in n]
    problems += [Problem(labels_name, f"{n}; every annotation must overlap its scene")
                 for n in outside]
    if problems:
        return None, problems, notes
    classes = [cfg.classes[i] for i in objects.class_idx]
    features = [Feature(geometry=g, properties={"class": c}, index=i)
                for i, (g, c) in enumerate(zip(pixel_to_map(objects.pixel_geoms,
                                                              scene.transform), classes,
                                                 strict=True))]
    labels_out = out_dir / f"{scene_id}.geojson"
    write_geojson(labels_out, features, scene.crs)
    try:
        cog_path = as_cog(local_scene, out_dir / f"{scene_id}.cog.tif")
    except InputError as exc:
        return None, [Problem(scene_name, _strip_path(str(exc), local_scene))], notes
    converted = cog_path != local_scene
    manifest = {
        "scene_id": scene_id, "object_type": cfg.name, "drop_id": drop_id,
        "source_scene": scene_name, "source_annotations": labels_name,
        "scene_sha256": file_sha256(local_scene), "width": scene.width, "height": scene.height,
        "bands": scene.count, "dtype": scene.dtype, "crs": scene.crs.to_string(),
        "transform": list(scene.transform)[:6], "gsd_m": scene.gsd_m,
        "objects": len(features), "objects_per_class": dict(Counter(classes)),
        "notes": notes,
        # scene_sha256 is the analyst's file; scene.tif is it, or its lossless COG conversion.
        "cog": {"converted": converted,
                "source": CATALOG_SOURCE_SCENE if converted else None,
                "scene_tif_sha256": file_sha256(cog_path) if converted else None},
    }
    return _ValidScene(pair, scene_id, manifest, labels_out, local_scene, cog_path), [], notes


def _strip_path(message: str, local: Path) -> str:
    # Messages name the scratch copy; the analyst knows the file by its name in the drop.
    return message.replace(f"{local}: ", "").replace(str(local), local.name)


IN_PROGRESS_MARKER = ".quarantine-in-progress"
CATALOGED_MARKER = ".autoretrain-cataloged.json"


def _quarantine_target(storage: Storage, object_type: str, drop_id: str) -> str:
    """A free quarantine folder, or this drop's own half-finished one after a crash.

    A drop id that was quarantined before (fixed and dropped again under the same id, then
    rejected again) gets ``<drop_id>-2``, ``-3``..., so earlier reasons are never overwritten:
    a folder with a ``reason.json`` is never reused.
    """
    folders = _quarantine_folders(storage, object_type, drop_id)
    if folders and storage.exists(join_key(folders[-1], IN_PROGRESS_MARKER)) and \
            not storage.exists(join_key(folders[-1], "reason.json")):
        return folders[-1]
    return _numbered(join_key(quarantine_prefix(object_type), drop_id), len(folders) + 1)


def _numbered(base: str, n: int) -> str:
    return base if n == 1 else f"{base}-{n}"


def _quarantine_folders(storage: Storage, object_type: str, drop_id: str) -> list[str]:
    """The quarantine folders a drop id has so far, oldest first."""
    base = join_key(quarantine_prefix(object_type), drop_id)
    folders: list[str] = []
    while storage.list(_numbered(base, len(folders) + 1)):
        folders.append(_numbered(base, len(folders) + 1))
    return folders


def ingest_drop(storage: Storage, cfg: ObjectTypeConfig, drop_id: str, *,
                scratch: str | Path | None = None, cycle_id: str = "") -> DropOutcome:
    """Validate one drop and catalog or quarantine it; see the module docstring."""
    base = join_key(incoming_prefix(cfg.name), drop_id)
    links = storage.links(base)
    if links:
        return _quarantine_links(storage, cfg.name, drop_id, base, links, cycle_id)
    listed = storage.list(base)
    finished = _finish_interrupted(storage, cfg.name, drop_id, base, listed)
    if finished is not None:
        return finished
    if not listed:
        raise RetrainError(f"{storage.url(base)}: drop not found or empty")
    # An object store takes keys with '.' or '..' parts; they would leave the drop's folder,
    # so they are named in the reason and left where they are, unread.
    keys = [k for k in listed if _stays_in_folder(k)]
    climbing = [Problem(k[len(base) + 1:], "a path with '.' or '..' parts would leave the "
                        "drop's folder; it is left in incoming/, unread")
                for k in listed if not _stays_in_folder(k)]
    pairs, problems, has_metadata = _pair_files(keys, base)
    problems = climbing + problems
    metadata: dict[str, str] = {}
    if has_metadata:
        metadata, meta_problems = _read_metadata(storage, join_key(base, DROP_METADATA))
        problems += meta_problems
    valid: list[_ValidScene] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=scratch, prefix="autoretrain-ingest-") as tmp:
        work = Path(tmp)
        if not problems:
            for pair in pairs:
                assert pair.labels_key is not None
                local_scene = storage.get_file(pair.scene_key,
                                               work / PurePosixPath(pair.scene_key).name)
                local_labels = storage.get_file(pair.labels_key, work / "labels" /
                                                PurePosixPath(pair.labels_key).name)
                scene, scene_problems, scene_notes = _validate_scene(
                    pair, local_scene, local_labels, cfg, drop_id, work / "normalised")
                problems += scene_problems
                notes += scene_notes
                if scene is not None:
                    valid.append(scene)
            duplicates = _duplicates(storage, cfg.name, valid, drop_id)
            problems += duplicates
        if problems:
            return _quarantine(storage, cfg.name, drop_id, base, keys, problems, notes,
                               metadata, cycle_id)
        for scene in valid:
            _catalog_scene(storage, cfg.name, scene, metadata, cycle_id)
    outcome = DropOutcome(drop_id, "cataloged", tuple(s.scene_id for s in valid),
                          sum(s.manifest["objects"] for s in valid), (), tuple(notes),
                          storage.url(catalog_prefix(cfg.name)))
    # The marker lets a rerun after a crash finish removing the drop as this run decided,
    # instead of judging what is left of it.
    marker = join_key(base, CATALOGED_MARKER)
    storage.put_json(marker, outcome.to_dict())
    for key in keys:
        storage.delete(key)
    storage.delete(marker)
    return outcome


def _finish_interrupted(storage: Storage, object_type: str, drop_id: str, base: str,
                        listed: Sequence[str]) -> DropOutcome | None:
    """The outcome of a drop that a stopped run had cataloged or quarantined and begun to
    remove from ``incoming/``: the removal is finished as that run decided. None otherwise."""
    marker = join_key(base, CATALOGED_MARKER)
    if marker in listed:
        outcome = TypeAdapter(DropOutcome).validate_python(storage.get_json(marker))
        for key in listed:
            if key != marker:
                storage.delete(key)
        storage.delete(marker)
        return outcome
    folders = _quarantine_folders(storage, object_type, drop_id)
    if not folders:
        return None
    target = folders[-1]
    in_progress = join_key(target, IN_PROGRESS_MARKER)
    reason_key = join_key(target, "reason.json")
    if not (storage.exists(in_progress) and storage.exists(reason_key)):
        return None
    reason = storage.get_json(reason_key)
    for key in listed:
        copy = join_key(target, _quarantined_name(key[len(base) + 1:]))
        if not storage.exists(copy):  # a file added after the crash is kept too
            storage.copy(key, copy)
        storage.delete(key)
    storage.delete(in_progress)
    storage.remove_empty_folder(base)
    return DropOutcome(drop_id, "quarantined", (), 0,
                       tuple(Problem(**p) for p in reason["problems"]),
                       tuple(reason["notes"]), storage.url(target))


def _quarantined_name(name: str) -> str:
    # Never let an analyst's own file named reason.json shadow ours.
    return "reason.original.json" if name == "reason.json" else name


def _duplicates(storage: Storage, object_type: str, scenes: Sequence[_ValidScene],
                drop_id: str) -> list[Problem]:
    known = {m["scene_sha256"]: m for m in list_catalog_scenes(storage, object_type)}
    problems = []
    for scene in scenes:
        match = known.get(scene.manifest["scene_sha256"])
        if match is not None and match["scene_id"] != scene.scene_id:
            problems.append(Problem(PurePosixPath(scene.pair.scene_key).name,
                                    f"same pixels as cataloged scene {match['scene_id']} "
                                    f"(drop {match['drop_id']}); re-annotating a cataloged "
                                    "scene is not supported yet"))
    return problems


def _catalog_scene(storage: Storage, object_type: str, scene: _ValidScene,
                   metadata: Mapping[str, str], cycle_id: str) -> None:
    prefix = join_key(catalog_prefix(object_type), scene.scene_id)
    manifest_key = join_key(prefix, CATALOG_MANIFEST)
    if storage.exists(manifest_key):
        existing = storage.get_json(manifest_key)
        if existing.get("scene_sha256") == scene.manifest["scene_sha256"]:
            return  # cataloged by an earlier, interrupted run
    if scene.cog_path != scene.scene_path:
        storage.put_file(scene.scene_path, join_key(prefix, CATALOG_SOURCE_SCENE))
    storage.put_file(scene.cog_path, join_key(prefix, CATALOG_SCENE))
    storage.put_file(scene.labels_path, join_key(prefix, CATALOG_ANNOTATIONS))
    storage.put_json(manifest_key, {
        **scene.manifest,
        "region": metadata.get("region", ""),
        "source": metadata.get("source", ""),
        "drop_notes": metadata.get("notes", ""),
        "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cycle_id": cycle_id,
    })


def _quarantine(storage: Storage, object_type: str, drop_id: str, base: str,
                keys: Sequence[str], problems: Sequence[Problem], notes: Sequence[str],
                metadata: Mapping[str, str], cycle_id: str, *,
                links: Mapping[str, str] | None = None) -> DropOutcome:
    """Copy the drop's files beside a ``reason.json``, move its ``links`` (key: name in the
    quarantine folder) unfollowed, then empty ``incoming/``."""
    links = links or {}
    target = _quarantine_target(storage, object_type, drop_id)
    reason = {
        "drop_id": drop_id, "object_type": object_type,
        "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cycle_id": cycle_id, "problems": [p.to_dict() for p in problems],
        "notes": list(notes), "metadata": dict(metadata),
        "files": sorted([k[len(base) + 1:] for k in keys] + list(links.values())),
        "next_steps": "fix the listed problems and drop the corrected files as a new drop",
    }
    # The marker lets a re-run after a crash recognise its own half-finished quarantine.
    marker = join_key(target, IN_PROGRESS_MARKER)
    storage.put_bytes(marker, b"")
    for key in keys:
        storage.copy(key, join_key(target, _quarantined_name(key[len(base) + 1:])))
    storage.put_json(join_key(target, "reason.json"), reason)
    for key, name in links.items():
        storage.move_link(key, join_key(target, name))
    for key in keys:
        storage.delete(key)
    storage.delete(marker)
    return DropOutcome(drop_id, "quarantined", (), 0, tuple(problems), tuple(notes),
                       storage.url(target))


def _quarantine_links(storage: Storage, object_type: str, drop_id: str, base: str,
                      links: Mapping[str, str], cycle_id: str) -> DropOutcome:
    """Quarantine a drop that is, or holds, a symbolic link, without following any link: the
    links themselves are moved (what they point to is never read), the other files copied."""
    if base in links:
        return _quarantine(storage, object_type, drop_id, base, [], [Problem(
            ".", f"the drop folder is a symbolic link (to {links[base]}); links are never "
            "followed: drop the files themselves")], [], {}, cycle_id, links={base: drop_id})
    names = {key: key[len(base) + 1:] for key in links}
    problems = [Problem(name, f"a symbolic link (to {links[key]}); links are never followed: "
                        "drop the file itself")
                for key, name in sorted(names.items(), key=lambda item: item[1])]
    # What lies under a linked folder is not the drop's: listings never enter one.
    keys = [k for k in storage.list(base) if k not in links]
    return _quarantine(storage, object_type, drop_id, base, keys, problems, [], {}, cycle_id,
                       links=names)


def ingest_drops(storage: Storage, cfg: ObjectTypeConfig, *, drop_ids: Sequence[str] | None = None,
                 scratch: str | Path | None = None, cycle_id: str = "",
                 on_drop: Callable[[DropOutcome], None] | None = None) -> IngestReport:
    """Ingest every waiting drop (or the given ones) of one object type."""
    outcomes = []
    for drop_id in drop_ids if drop_ids is not None else list_drops(storage, cfg.name):
        outcome = ingest_drop(storage, cfg, drop_id, scratch=scratch, cycle_id=cycle_id)
        outcomes.append(outcome)
        if on_drop is not None:
            on_drop(outcome)
    if drop_ids is None:
        for name in list_unusable_drops(storage, cfg.name):
            outcome = DropOutcome(name[:80], "ignored", notes=(
                f"a drop named {name[:80]!r} cannot be ingested: a drop id must not be '.' or "
                "'..', hold '\\' or NUL, or exceed 255 bytes; rename the folder (it is left "
                "in incoming/, unread)",))
            outcomes.append(outcome)
            if on_drop is not None:
                on_drop(outcome)
        for drop_id, age_h in list_empty_drops(storage, cfg.name).items():
            outcome = _empty_drop(storage, cfg, drop_id, age_h, cycle_id)
            outcomes.append(outcome)
            if on_drop is not None:
                on_drop(outcome)
    return IngestReport(cfg.name, tuple(outcomes))
