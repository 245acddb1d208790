"""Both storage backends, the S3 one against a real HTTP endpoint (moto server mode)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from retrain_lib.core.errors import StorageError
from retrain_lib.core.layout import join_key
from retrain_lib.core.storage import LocalStorage, S3Storage, Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_open_storage_picks_backend(tmp_path: Path, s3_bucket: str) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    s3 = open_storage(f"s3://{s3_bucket}/p/")
    assert isinstance(s3, S3Storage)
    assert s3.uri == f"s3://{s3_bucket}/p"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")


def test_bytes_json_and_files_round_trip(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("a/b/c.bin", b"\x00\x01payload")
    assert storage.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    storage.put_json("a/manifest.json", {"scene": "s1", "objects": 3})
    assert storage.get_json("a/manifest.json") == {"scene": "s1", "objects": 3}

    local = tmp_path / "in.txt"
    local.write_text("hello")
    storage.put_file(local, "files/in.txt")
    out = storage.get_file("files/in.txt", tmp_path / "out" / "copy.txt")
    assert out.read_text() == "hello"
    with storage.local_copy("files/in.txt") as path:
        assert path.read_text() == "hello"


def test_list_exists_children(storage: Storage) -> None:
    for key in ("incoming/vehicle/d1/s1.tif", "incoming/vehicle/d1/s1.geojson",
                "incoming/vehicle/d2/s2.tif", "catalog/x.json"):
        storage.put_bytes(key, b"x")
    assert storage.list("incoming/vehicle") == [
        "incoming/vehicle/d1/s1.geojson", "incoming/vehicle/d1/s1.tif",
        "incoming/vehicle/d2/s2.tif"]
    assert storage.list("incoming/vehicle/d1/s1.tif") == ["incoming/vehicle/d1/s1.tif"]
    assert storage.list("nothing/here") == []
    assert storage.list_children("incoming/vehicle") == ["d1", "d2"]
    assert set(storage.list()) == {"incoming/vehicle/d1/s1.tif",
                                   "incoming/vehicle/d1/s1.geojson",
                                   "incoming/vehicle/d2/s2.tif", "catalog/x.json"}
    assert storage.exists("catalog/x.json")
    assert not storage.exists("catalog")
    assert not storage.exists("catalog/y.json")


def test_copy_move_delete(storage: Storage) -> None:
    storage.put_bytes("src/one.txt", b"1")
    storage.copy("src/one.txt", "dst/one.txt")
    assert storage.get_bytes("dst/one.txt") == b"1"
    assert storage.exists("src/one.txt")
    storage.move("src/one.txt", "moved/one.txt")
    assert not storage.exists("src/one.txt")
    assert storage.get_bytes("moved/one.txt") == b"1"
    storage.delete("moved/one.txt")
    storage.delete("moved/one.txt")  # deleting a missing object is fine
    assert not storage.exists("moved/one.txt")


def test_move_prefix_moves_a_whole_drop(storage: Storage) -> None:
    storage.put_bytes("incoming/t/drop1/a.tif", b"A")
    storage.put_bytes("incoming/t/drop1/a.geojson", b"{}")
    storage.put_bytes("incoming/t/drop2/b.tif", b"B")
    moved = storage.move_prefix("incoming/t/drop1", "quarantine/t/drop1")
    assert moved == ["quarantine/t/drop1/a.geojson", "quarantine/t/drop1/a.tif"]
    assert storage.list("incoming/t") == ["incoming/t/drop2/b.tif"]
    assert storage.get_bytes("quarantine/t/drop1/a.tif") == b"A"


def test_missing_objects_and_bad_keys_raise_storage_error(storage: Storage,
                                                           tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such object"):
        storage.get_bytes("nope.json")
    with pytest.raises(StorageError, match="no such object"):
        storage.get_file("nope.json", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put_bytes("../escape", b"")
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.get_bytes("/abs")
    storage.put_bytes("bad.json", b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        storage.get_json("bad.json")
    assert isinstance(StorageError("x"), OSError)


def _manifest(version: int) -> dict:
    # Large enough that a torn write would be visible as truncated JSON.
    payload = f"{version:08d}" * 40_000
    return {"version": version, "payload": payload,
            "sha256": hashlib.sha256(payload.encode()).hexdigest()}


def test_reader_racing_writer_never_sees_half_a_manifest(storage: Storage) -> None:
    key = "catalog/vehicle/scenes/s1/manifest.json"
    storage.put_json(key, _manifest(0))
    stop = threading.Event()
    errors: list[str] = []
    seen: set[int] = set()

    def read_loop() -> None:
        while not stop.is_set():
            raw = storage.get_bytes(key)
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError:
                errors.append(f"torn read of {len(raw)} bytes")
                continue
            if hashlib.sha256(doc["payload"].encode()).hexdigest() != doc["sha256"]:
                errors.append(f"mixed content in version {doc['version']}")
            seen.add(doc["version"])

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for version in range(1, 25):
            storage.put_json(key, _manifest(version))
    finally:
        stop.set()
        reader.join(timeout=30)
    assert errors == []
    assert len(seen) >= 2, "the reader should have observed several versions"
    assert storage.get_json(key)["version"] == 24


def test_local_listing_hides_in_flight_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".manifest.json.123.tmp").write_text("{")
    storage.put_bytes("a/manifest.json", b"{}")
    assert storage.list("a") == ["a/manifest.json"]


def test_unreachable_s3_endpoint_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("AUTORETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = S3Storage("s3://bucket/prefix")
    with pytest.raises(StorageError, match="unreachable"):
        storage.get_bytes("manifest.json")


def test_missing_bucket_is_named(s3_env: str) -> None:
    storage = open_storage("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        storage.put_bytes("a.json", b"{}")


def test_join_key() -> None:
    assert join_key("a/", "/b", "", "c.json") == "a/b/c.json"


def test_put_tree_and_get_tree(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "shard"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(b"A")
    (src / "labels").mkdir()
    (src / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (src / "index.json").write_text("{}")
    keys = storage.put_tree(src, "chips/t/h/s1", last="index.json")
    assert keys[-1] == "chips/t/h/s1/index.json"
    assert sorted(keys) == ["chips/t/h/s1/images/a.jpg", "chips/t/h/s1/index.json",
                            "chips/t/h/s1/labels/a.txt"]
    out = storage.get_tree("chips/t/h/s1", tmp_path / "copy")
    assert (out / "labels" / "a.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"
    assert (out / "images" / "a.jpg").read_bytes() == b"A"
