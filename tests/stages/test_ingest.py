"""Ingest: good drops reach the catalog, bad ones quarantine with reasons, nothing is lost."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from retrain_lib.core.config import IngestConfig, ObjectTypeConfig
from retrain_lib.core.errors import StorageError
from retrain_lib.core.storage import LocalStorage, Storage, open_storage
from retrain_lib.devtools.synthetic import SceneSpec, make_drop
from retrain_lib.stages.ingest import (
    count_pending_annotations,
    ingest_drop,
    ingest_drops,
    list_catalog_scenes,
    list_drops,
    list_empty_drops,
)

CFG = ObjectTypeConfig(name="vehicle", classes=["car", "truck"],
                       class_aliases={"lorry": "truck"})


def drop_locally(tmp_path: Path, drop_id: str, seed: int = 0, n: int = 1, **spec: object
                 ) -> Path:
    folder = tmp_path / "src" / drop_id
    make_drop(folder, [SceneSpec(scene_id=f"s{i}", width=256, height=256, objects_per_class=3,
                                 decoys=1, seed=seed * 10 + i, **spec) for i in range(n)])
    return folder


def upload(storage: Storage, folder: Path, drop_id: str) -> None:
    for path in sorted(folder.iterdir()):
        storage.put_file(path, f"incoming/vehicle/{drop_id}/{path.name}")


@pytest.fixture()
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_good_drop_is_cataloged_then_removed_from_incoming(storage: LocalStorage,
                                                           tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "d1", n=2)
    (folder / "drop.json").write_text(json.dumps({"region": "vegetated", "source": "test"}))
    upload(storage, folder, "d1")
    assert count_pending_annotations(storage, "vehicle") == {"d1": 12}

    outcome = ingest_drop(storage, CFG, "d1")
    assert outcome.status == "cataloged", outcome.problems
    assert outcome.scene_ids == ("d1-s0", "d1-s1")
    assert outcome.annotations == 12
    assert list_drops(storage, "vehicle") == []
    manifests = list_catalog_scenes(storage, "vehicle")
    assert [m["scene_id"] for m in manifests] == ["d1-s0", "d1-s1"]
    first = manifests[0]
    assert first["region"] == "vegetated" and first["crs"] == "EPSG:32633"
    assert first["objects_per_class"] == {"car": 3, "truck": 3}
    for name in ("scene.tif", "annotations.geojson", "manifest.json"):
        assert storage.exists(f"catalog/vehicle/scenes/d1-s0/{name}")
    labels = json.loads(storage.get_bytes("catalog/vehicle/scenes/d1-s0/annotations.geojson"))
    assert {f["properties"]["class"] for f in labels["features"]} == {"car", "truck"}


@pytest.mark.parametrize("already_cog", [False, True])
def test_scenes_are_cataloged_as_cogs_and_the_analysts_file_is_kept(
        storage: LocalStorage, tmp_path: Path, already_cog: bool) -> None:
    import numpy as np
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from retrain_lib.geo.raster import as_cog

    folder = tmp_path / "src" / "d1"
    make_drop(folder, [SceneSpec(scene_id="s0", width=768, height=768, objects_per_class=3,
                                 decoys=1, seed=3)])
    dropped = folder / "s0.tif"
    with rasterio.open(dropped) as src:  # as many sensors write them: in strips, no overviews
        profile, pixels = {**src.profile, "tiled": False}, src.read()
    for key in ("blockxsize", "blockysize"):
        profile.pop(key, None)
    with rasterio.open(dropped, "w", **profile) as dst:
        dst.write(pixels)
    assert not cog_validate(str(dropped), quiet=True)[0]
    if already_cog:
        os.replace(as_cog(dropped, tmp_path / "cog.tif"), dropped)
    original = dropped.read_bytes()
    upload(storage, folder, "d1")
    assert ingest_drop(storage, CFG, "d1").status == "cataloged"
    scene = storage.path("catalog/vehicle/scenes/d1-s0/scene.tif")
    assert cog_validate(str(scene), quiet=True)[0]  # windows can be read in place
    manifest = storage.get_json("catalog/vehicle/scenes/d1-s0/manifest.json")
    assert manifest["cog"]["converted"] is not already_cog
    source = storage.path("catalog/vehicle/scenes/d1-s0/source.tif")
    if already_cog:
        assert scene.read_bytes() == original and not source.exists()
        return
    # The analyst's file, byte for byte, and the conversion holds the same pixels.
    assert source.read_bytes() == original
    assert manifest["cog"]["source"] == "source.tif"
    with rasterio.open(source) as a, rasterio.open(scene) as b:
        assert np.array_equal(a.read(), b.read()) and a.profile["crs"] == b.profile["crs"]
        assert a.transform == b.transform and b.overviews(1)
    import hashlib

    assert manifest["scene_sha256"] == hashlib.sha256(original).hexdigest()


def test_annotations_in_wgs84_and_aliases_are_normalised(storage: LocalStorage,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "src" / "d2"
    make_drop(folder, [SceneSpec(scene_id="s", width=256, height=256, objects_per_class=2,
                                 decoys=0)], annotations_epsg=4326)
    doc = json.loads((folder / "s.geojson").read_text())
    for feature in doc["features"]:
        if feature["properties"]["class"] == "truck":
            feature["properties"]["class"] = "Lorry"
    (folder / "s.geojson").write_text(json.dumps(doc))
    upload(storage, folder, "d2")
    outcome = ingest_drop(storage, CFG, "d2")
    assert outcome.status == "cataloged", outcome.problems
    labels = json.loads(storage.get_bytes("catalog/vehicle/scenes/d2-s/annotations.geojson"))
    assert "32633" in labels["crs"]["properties"]["name"]
    assert sorted(f["properties"]["class"] for f in labels["features"]) == [
        "car", "car", "truck", "truck"]


def quarantined(storage: Storage, drop_id: str) -> dict:
    return storage.get_json(f"quarantine/vehicle/{drop_id}/reason.json")


def test_unknown_class_quarantines_the_whole_drop(storage: LocalStorage,
                                                  tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "bad", n=2)
    doc = json.loads((folder / "s1.geojson").read_text())
    doc["features"][0]["properties"]["class"] = "tank"
    (folder / "s1.geojson").write_text(json.dumps(doc))
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    upload(storage, folder, "bad")

    outcome = ingest_drop(storage, CFG, "bad")
    assert outcome.status == "quarantined"
    reason = quarantined(storage, "bad")
    assert reason["problems"][0]["file"] == "s1.geojson"
    assert "unknown class 'tank'" in reason["problems"][0]["problem"]
    assert "feature 0" in reason["problems"][0]["problem"]
    # Untouched, complete, and gone from incoming; nothing reached the catalog.
    for name, data in originals.items():
        assert storage.get_bytes(f"quarantine/vehicle/bad/{name}") == data
    assert list_drops(storage, "vehicle") == []
    assert list_catalog_scenes(storage, "vehicle") == []


def test_a_link_out_of_the_root_is_quarantined_never_followed(storage: LocalStorage,
                                                               tmp_path: Path) -> None:
    outside = drop_locally(tmp_path, "outside", seed=3)  # a scene outside the storage root
    folder = drop_locally(tmp_path, "d1")
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    upload(storage, folder, "d1")
    drop = storage.path("incoming/vehicle/d1")
    (drop / "secret.tif").symlink_to(outside / "s0.tif")
    (drop / "secret.geojson").symlink_to(outside / "s0.geojson")

    outcome = ingest_drop(storage, CFG, "d1")
    assert outcome.status == "quarantined"
    problems = {p.file: p.problem for p in outcome.problems}
    assert set(problems) == {"secret.tif", "secret.geojson"}
    assert problems["secret.tif"].startswith(f"a symbolic link (to {outside / 's0.tif'}); "
                                             "links are never followed")
    # Nothing reached the catalog; the drop's own files are in quarantine byte for byte, and
    # the links are there as links: what they point to was never read or copied.
    assert list_catalog_scenes(storage, "vehicle") == []
    target = storage.path("quarantine/vehicle/d1")
    for name, data in originals.items():
        assert (target / name).read_bytes() == data
    assert (target / "secret.tif").is_symlink()
    assert (target / "secret.tif").readlink() == outside / "s0.tif"
    assert quarantined(storage, "d1")["files"] == sorted([*originals, "secret.geojson",
                                                          "secret.tif"])
    assert not drop.exists()


def test_a_drop_folder_that_is_a_link_is_quarantined_not_ignored(storage: LocalStorage,
                                                                  tmp_path: Path) -> None:
    outside = drop_locally(tmp_path, "elsewhere")
    incoming = storage.path("incoming/vehicle")
    incoming.mkdir(parents=True)
    (incoming / "linked").symlink_to(outside, target_is_directory=True)
    assert list_drops(storage, "vehicle") == ["linked"]
    assert count_pending_annotations(storage, "vehicle") == {"linked": 0}  # not read

    [outcome] = ingest_drops(storage, CFG).outcomes
    assert outcome.status == "quarantined"
    assert outcome.problems[0].file == "."
    assert f"the drop folder is a symbolic link (to {outside})" in outcome.problems[0].problem
    moved = storage.path("quarantine/vehicle/linked/linked")
    assert moved.is_symlink() and moved.readlink() == outside
    assert sorted(p.name for p in outside.iterdir()) == ["s0.geojson", "s0.tif"]  # untouched
    assert list_drops(storage, "vehicle") == []


def test_storage_refuses_to_read_through_a_link_out_of_its_root(storage: LocalStorage,
                                                                tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    storage.put_bytes("a/inside.txt", b"fine")
    storage.path("a/link.txt").symlink_to(secret)
    storage.path("a/inner.txt").symlink_to(storage.path("a/inside.txt"))
    assert storage.get_bytes("a/inner.txt") == b"fine"  # a link inside the root is harmless
    for read in (lambda: storage.get_bytes("a/link.txt"),
                 lambda: storage.get_file("a/link.txt", tmp_path / "copy.txt"),
                 lambda: storage.copy("a/link.txt", "b/copy.txt")):
        with pytest.raises(StorageError, match="a symbolic link out of the storage root"):
            read()
    assert storage.links("a") == {"a/inner.txt": str(storage.path("a/inside.txt")),
                                  "a/link.txt": str(secret)}


def test_an_empty_drop_waits_then_is_quarantined_with_a_reason(storage: LocalStorage,
                                                                tmp_path: Path) -> None:
    empty = storage.path("incoming/vehicle/empty")
    (empty / "sub").mkdir(parents=True)  # folders only: still no file
    upload(storage, drop_locally(tmp_path, "d1"), "d1")
    assert list_drops(storage, "vehicle") == ["d1"]
    assert list(list_empty_drops(storage, "vehicle")) == ["empty"]

    report = ingest_drops(storage, CFG)
    assert [o.status for o in report.outcomes] == ["cataloged", "waiting"]
    [waiting] = report.waiting
    assert waiting.notes[0].startswith("drop empty is empty (0.0 h old); waiting for files; "
                                       "quarantined if still empty after 24 h")
    assert report.to_dict()["waiting"] == 1 and empty.is_dir()

    two_days_ago = time.time() - 48 * 3600
    os.utime(empty, (two_days_ago, two_days_ago))
    [outcome] = ingest_drops(storage, CFG).outcomes
    assert outcome.status == "quarantined"
    assert outcome.problems[0].problem.startswith(
        "the drop folder has been empty for 48.0 h (limit 24 h, "
        "ingest.empty_drop_quarantine_hours)")
    assert quarantined(storage, "empty")["files"] == []
    assert not empty.exists() and list_empty_drops(storage, "vehicle") == {}

    # With no limit, an empty drop waits for ever, and says so.
    forever = CFG.model_copy(update={"ingest": IngestConfig(empty_drop_quarantine_hours=None)})
    (storage.path("incoming/vehicle/later")).mkdir()
    os.utime(storage.path("incoming/vehicle/later"), (two_days_ago, two_days_ago))
    [outcome] = ingest_drops(storage, forever).outcomes
    assert outcome.status == "waiting" and outcome.notes == (
        "drop later is empty (48.0 h old); waiting for files",)


@pytest.mark.parametrize("breakage, file, expected", [
    ("no_labels", "s0.tif", "no annotation file"),
    ("orphan_labels", "s9.geojson", "annotations without a scene"),
    ("corrupt_raster", "s0.tif", "cannot open as a raster"),
    ("not_json", "s0.geojson", "not valid JSON"),
    ("outside", "s0.geojson", "none of its 6 annotations overlaps scene s0.tif ("),
    ("nan", "s0.geojson", "feature 0: Polygon coordinates[0][0][0]: got NaN; expected a finite"),
    ("stray_file", "notes.docx", "unexpected file"),
    ("bad_metadata", "drop.json", "unknown key(s) regoin"),
])
def test_each_bad_input_has_a_reason(storage: LocalStorage, tmp_path: Path, breakage: str,
                                     file: str, expected: str) -> None:
    folder = drop_locally(tmp_path, "x")
    if breakage == "no_labels":
        (folder / "s0.geojson").unlink()
    elif breakage == "orphan_labels":
        (folder / "s9.geojson").write_text('{"type":"FeatureCollection","features":[]}')
    elif breakage == "corrupt_raster":
        (folder / "s0.tif").write_bytes(b"II*\x00garbage" * 10)
    elif breakage == "not_json":
        (folder / "s0.geojson").write_text("{not json")
    elif breakage == "outside":
        doc = json.loads((folder / "s0.geojson").read_text())
        for feature in doc["features"]:
            ring = feature["geometry"]["coordinates"][0]
            feature["geometry"]["coordinates"][0] = [[x + 1e6, y] for x, y in ring]
        (folder / "s0.geojson").write_text(json.dumps(doc))
    elif breakage == "nan":
        doc = json.loads((folder / "s0.geojson").read_text())
        doc["features"][0]["geometry"]["coordinates"][0][0][0] = float("nan")
        (folder / "s0.geojson").write_text(json.dumps(doc))  # Python writes NaN, as some tools do
    elif breakage == "stray_file":
        (folder / "notes.docx").write_bytes(b"x")
    elif breakage == "bad_metadata":
        (folder / "drop.json").write_text('{"regoin": "arid"}')
    upload(storage, folder, "x")
    outcome = ingest_drop(storage, CFG, "x")
    assert outcome.status == "quarantined"
    problems = quarantined(storage, "x")["problems"]
    assert any(p["file"] == file and expected in p["problem"] for p in problems), problems
    # The analyst knows the files by their names in the drop, never by a scratch copy.
    assert not any("autoretrain-ingest-" in p["problem"] for p in problems), problems
    assert list_drops(storage, "vehicle") == []


def test_empty_annotation_file_is_a_scene_without_objects(storage: LocalStorage,
                                                          tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "e")
    (folder / "s0.geojson").write_text('{"type":"FeatureCollection","features":[]}')
    upload(storage, folder, "e")
    outcome = ingest_drop(storage, CFG, "e")
    assert outcome.status == "cataloged"
    assert outcome.annotations == 0


def test_rerun_after_a_crash_neither_loses_nor_duplicates(storage: LocalStorage,
                                                          tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "d1")
    upload(storage, folder, "d1")
    # Simulate a crash after cataloging but before incoming was cleaned up.
    ingest_drop(storage, CFG, "d1")
    upload(storage, folder, "d1")
    outcome = ingest_drop(storage, CFG, "d1")
    assert outcome.status == "cataloged"
    assert [m["scene_id"] for m in list_catalog_scenes(storage, "vehicle")] == ["d1-s0"]
    assert list_drops(storage, "vehicle") == []


class _Stopped(BaseException):
    """Raised in place of a crash; BaseException, so no ``except Exception`` swallows it."""


_WRITES = ("put_file", "put_bytes", "put_json", "copy", "delete")


def _count_writes(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch,
                  stop_after: int | None = None) -> list[str]:
    """Record each write ``storage`` makes; raise _Stopped after the ``stop_after``-th."""
    calls: list[str] = []

    def counted(name: str) -> Any:
        method = getattr(LocalStorage, name)

        def write(*args: Any, **kwargs: Any) -> Any:
            result = method(storage, *args, **kwargs)
            calls.append(name)
            if len(calls) == stop_after:
                raise _Stopped
            return result
        return write

    for name in _WRITES:
        monkeypatch.setattr(storage, name, counted(name))
    return calls


@pytest.mark.parametrize("kind", ["cataloged", "quarantined"])
def test_a_run_stopped_after_any_write_is_finished_by_the_next_as_first_decided(
        kind: str, storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    folder = drop_locally(tmp_path, "d1", n=2)
    (folder / "drop.json").write_text(json.dumps({"region": "vegetated"}))
    if kind == "quarantined":
        doc = json.loads((folder / "s1.geojson").read_text())
        doc["features"][0]["properties"]["class"] = "tank"
        (folder / "s1.geojson").write_text(json.dumps(doc))
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    # Count the writes of one whole ingest, then stop a fresh run after each of them in turn.
    counted = LocalStorage(tmp_path / "count")
    upload(counted, folder, "d1")
    with monkeypatch.context() as patch:
        calls = _count_writes(counted, patch)
        expected = ingest_drop(counted, CFG, "d1")
    assert expected.status == kind and len(calls) > 6, calls
    for stop_after in range(1, len(calls)):
        root = LocalStorage(tmp_path / f"run-{stop_after}")
        upload(root, folder, "d1")
        with monkeypatch.context() as patch:
            _count_writes(root, patch, stop_after)
            with pytest.raises(_Stopped):
                ingest_drop(root, CFG, "d1")
        outcome = ingest_drop(root, CFG, "d1")
        where = f"stopped after write {stop_after} of {len(calls)}"
        assert (outcome.status, outcome.scene_ids, outcome.problems) == (
            expected.status, expected.scene_ids, expected.problems), where
        assert list_drops(root, "vehicle") == [] and not root.list("incoming"), where
        keys = root.list()
        assert not [k for k in keys if "/." in k], (where, keys)  # no marker left
        if kind == "cataloged":
            manifests = list_catalog_scenes(root, "vehicle")
            assert [(m["scene_id"], m["region"]) for m in manifests] == [
                ("d1-s0", "vegetated"), ("d1-s1", "vegetated")], where
        else:
            reason = quarantined(root, "d1")
            assert reason["metadata"] == {"region": "vegetated"}, where
            assert reason["files"] == sorted(originals), where
            for name, data in originals.items():
                assert root.get_bytes(f"quarantine/vehicle/d1/{name}") == data, where
            assert not root.exists("quarantine/vehicle/d1-2/reason.json"), where


def test_same_pixels_in_a_new_drop_are_quarantined_as_duplicate(storage: LocalStorage,
                                                                tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "d1")
    upload(storage, folder, "d1")
    upload(storage, folder, "d2")
    report = ingest_drops(storage, CFG)
    assert [o.status for o in report.outcomes] == ["cataloged", "quarantined"]
    assert "same pixels as cataloged scene d1-s0" in report.outcomes[1].problems[0].problem


def test_requarantine_of_a_reused_drop_id_keeps_the_first_reason(storage: LocalStorage,
                                                                 tmp_path: Path) -> None:
    folder = drop_locally(tmp_path, "b")
    (folder / "s0.geojson").unlink()
    upload(storage, folder, "b")
    ingest_drop(storage, CFG, "b")
    upload(storage, folder, "b")
    second = ingest_drop(storage, CFG, "b")
    assert second.location.endswith("quarantine/vehicle/b-2")
    assert storage.exists("quarantine/vehicle/b/reason.json")
    assert storage.exists("quarantine/vehicle/b-2/reason.json")


def test_report_counts(storage: LocalStorage, tmp_path: Path) -> None:
    upload(storage, drop_locally(tmp_path, "a", seed=1), "a")
    bad = drop_locally(tmp_path, "b", seed=2)
    (bad / "s0.geojson").unlink()
    upload(storage, bad, "b")
    report = ingest_drops(storage, CFG)
    summary = report.to_dict()
    assert summary["cataloged"] == 1 and summary["quarantined"] == 1
    assert summary["scene_ids"] == ["a-s0"] and summary["new_annotations"] == 6


def test_drop_names_that_would_escape_their_folder_are_left_alone(s3_bucket: str,
                                                                    tmp_path: Path) -> None:
    import boto3

    storage = open_storage(f"s3://{s3_bucket}/root")
    client = boto3.client("s3", endpoint_url=os.environ["AUTORETRAIN_S3_ENDPOINT_URL"])
    names = ["..", "x" * 300, "ok", "with space"]
    for i, name in enumerate(names):  # S3 takes any key; a folder name could not hold these
        folder = drop_locally(tmp_path, f"d{i}", seed=i)
        for path in sorted(folder.iterdir()):
            client.upload_file(str(path), s3_bucket, f"root/incoming/vehicle/{name}/{path.name}")
    # A drop holding a key that climbs out of it: that key is refused and left, unread.
    client.put_object(Bucket=s3_bucket, Key="root/incoming/vehicle/ok/../../escape.tif", Body=b"1")
    report = ingest_drops(storage, CFG)
    status = {o.drop_id: o.status for o in report.outcomes}
    assert status == {"ok": "quarantined", "with space": "cataloged", "..": "ignored",
                      "x" * 80: "ignored"}
    [climbing] = next(o for o in report.outcomes if o.drop_id == "ok").problems
    assert climbing.file == "../../escape.tif"
    assert "'.' or '..'" in climbing.problem
    ignored = {o.drop_id: o.notes[0] for o in report.outcomes if o.status == "ignored"}
    assert "cannot be ingested: a drop id must not be '.' or '..'" in ignored[".."]
    # Nothing outside incoming/<type>/ was read or written for them, and they are still there.
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="root/")[
        "Contents"]}
    assert {f"root/incoming/vehicle/../{p.name}" for p in folder.iterdir()} <= keys
    assert "root/incoming/vehicle/ok/../../escape.tif" in keys
    assert not [k for k in keys if k.startswith("root/incoming/../")
                or not k.startswith("root/")]


def test_ingest_over_s3(s3_bucket: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{s3_bucket}/root")
    upload(storage, drop_locally(tmp_path, "d1"), "d1")
    bad = drop_locally(tmp_path, "d2", seed=3)
    (bad / "s0.tif").unlink()
    upload(storage, bad, "d2")
    report = ingest_drops(storage, CFG)
    assert [o.status for o in report.outcomes] == ["cataloged", "quarantined"]
    assert storage.list("incoming/vehicle") == []
    assert storage.exists("catalog/vehicle/scenes/d1-s0/manifest.json")
    assert storage.exists("quarantine/vehicle/d2/s0.geojson")
