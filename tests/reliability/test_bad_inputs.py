"""Bad input gets one clear message, never a traceback, and nothing an analyst dropped is lost.

Three ways in, each held to the same rules:

- **The command line** (``CLI_CASES``): each case runs ``autoretrain`` in a real process and
  checks the exit code (2: bad input), that no traceback is printed, and that the message names
  the offending file (or field).
- **A cycle's ingest** (``DROP_CASES``), on local storage and on S3 over HTTP: every bad drop
  is quarantined with a reason that names its file and what is wrong, every byte dropped is
  still under the storage root, and the good drop beside them is cataloged.
- **Generated input** (hypothesis): malformed GeoJSON (coordinates, geometry types,
  properties, nesting) through the one GeoJSON reader and the truth loader, and malformed
  configs through the config parser. Any exception other than the project's own is a failure.

docs/reliability.md reports the counts; a test keeps them true.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrain_lib.core.config import parse_object_type_config
from retrain_lib.core.errors import ConfigError, InputError
from retrain_lib.core.storage import Storage
from tests.conftest import BACKENDS, REPO_ROOT, put_folder, storage_backend
from tests.reliability.test_crashes import CRASH_POINTS, OUTAGES, S3_CRASH_POINTS
from tests.training.test_train import make_dataset

AUTORETRAIN = str(Path(sys.executable).with_name("autoretrain"))
VALID_CONFIG: dict[str, Any] = {"name": "vehicle", "classes": ["car", "truck"]}


# --------------------------------------------------------------------------- shared files


def _scene(folder: Path, stem: str = "s0", seed: int = 1) -> tuple[Path, Path]:
    """A small valid scene and its annotations."""
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    make_drop(folder, [SceneSpec(scene_id=stem, width=128, height=128, objects_per_class=2,
                                 decoys=0, seed=seed)])
    return folder / f"{stem}.tif", folder / f"{stem}.geojson"


def _edit_labels(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))  # NaN and Infinity are written as JavaScript does


def _set_first_coordinate(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["features"][0]["geometry"]["coordinates"][0][0][0] = value
    return edit


def _no_crs_scene(path: Path) -> None:
    import numpy as np
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3,
                       dtype="uint8") as dst:
        dst.write(np.zeros((3, 64, 64), dtype="uint8"))


# --------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class CliCase:
    """One bad input through ``autoretrain``: how to make it, and what the user must read."""

    name: str
    make: Callable[[Path], list[str]]  # writes files under the folder, returns the arguments
    names: str  # what the message must name (a file or a field)


def _config_case(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "vehicle.yaml").write_text(text)
        return ["config", "validate", str(tmp / "vehicle.yaml")]
    return make


def _tile_case(break_it: Callable[[Path, Path], None]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        scene, labels = _scene(tmp / "in")
        break_it(scene, labels)
        return ["tile", str(scene), "--labels", str(labels), "--classes", "car,truck",
                "--out", str(tmp / "out")]
    return make


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


CLI_CASES = [
    CliCase("config file missing", lambda t: ["config", "validate", str(t / "nope.yaml")],
            "nope.yaml"),
    CliCase("config not YAML", _config_case("name: vehicle\nclasses: [car\n"), "vehicle.yaml"),
    CliCase("config empty", _config_case(""), "vehicle.yaml"),
    CliCase("config unknown key", _config_case("name: vehicle\nclasses: [car]\ncolour: red\n"),
            "colour"),
    CliCase("config wrong type", _config_case(
        "name: vehicle\nclasses: [car]\ntraining: {epochs: many}\n"), "training.epochs"),
    CliCase("config out of range", _config_case(
        "name: vehicle\nclasses: [car]\ntiling: {overlap: -1}\n"), "tiling.overlap"),
    CliCase("config no classes", _config_case("name: vehicle\nclasses: []\n"), "classes"),
    CliCase("config name mismatch", _config_case("name: ship\nclasses: [ship]\n"), "vehicle"),
    CliCase("config bad schedule", _config_case(
        "name: vehicle\nclasses: [car]\nschedule: often\n"), "schedule"),
    CliCase("config unknown runner", _config_case(
        "name: vehicle\nclasses: [car]\nrunner: {kind: slurm}\n"), "runner.kind"),
    CliCase("config weights by a bare name", _config_case(
        "name: vehicle\nclasses: [car]\ntraining: {initial_model: yolo11n.pt}\n"),
        "training.initial_model"),
    CliCase("config a list, not a mapping", _config_case("- name: vehicle\n"), "vehicle.yaml"),
    CliCase("scene missing", lambda t: ["tile", str(t / "gone.tif"), "--labels",
                                        str(t / "gone.geojson"), "--classes", "car",
                                        "--out", str(t / "out")], "gone.tif"),
    CliCase("scene not a raster", _tile_case(lambda s, _l: s.write_bytes(b"II*\x00junk" * 20)),
            "s0.tif"),
    CliCase("scene truncated", _tile_case(lambda s, _l: _truncate(s)), "s0.tif"),
    CliCase("scene without CRS", _tile_case(lambda s, _l: _no_crs_scene(s)), "s0.tif"),
    CliCase("labels not JSON", _tile_case(lambda _s, lab: lab.write_text("{oops")),
            "s0.geojson"),
    CliCase("labels NaN coordinate", _tile_case(
        lambda _s, lab: _edit_labels(lab, _set_first_coordinate(math.nan))), "s0.geojson"),
    CliCase("labels text coordinate", _tile_case(
        lambda _s, lab: _edit_labels(lab, _set_first_coordinate("12"))), "s0.geojson"),
    CliCase("labels unknown class", _tile_case(lambda _s, lab: _edit_labels(
        lab, lambda d: d["features"][0]["properties"].update({"class": "tank"}))), "tank"),
    CliCase("labels outside the scene", _tile_case(lambda _s, lab: _edit_labels(
        lab, lambda d: [f["geometry"].update({"coordinates": [[[x + 1e6, y] for x, y in
                                                               f["geometry"]["coordinates"][0]]]})
                        for f in d["features"]])), "s0.geojson"),
    CliCase("model file missing", lambda t: ["detect", str(_scene(t / "in")[0]), "--model",
                                             str(t / "best.pt"), "--out", str(t / "o.geojson")],
            "best.pt"),
    CliCase("model file not weights", lambda t: [
        "detect", str(_scene(t / "in")[0]), "--model",
        str((t / "junk.pt", (t / "junk.pt").write_bytes(b"not a model"))[0]),
        "--out", str(t / "o.geojson")], "junk.pt"),
    CliCase("predictions missing", lambda t: [
        "evaluate", "--pred", str(t / "pred.geojson"), "--truth", str(_scene(t / "in")[1]),
        "--out", str(t / "m.json")], "pred.geojson"),
    CliCase("predictions not GeoJSON", lambda t: [
        "evaluate", "--pred", str((t / "p.geojson", (t / "p.geojson").write_text("[1, 2]"))[0]),
        "--truth", str(_scene(t / "in")[1]), "--out", str(t / "m.json")], "p.geojson"),
    CliCase("dataset missing", lambda t: ["train", "--data", str(t / "no-dataset"),
                                          "--weights", "yolo11n.yaml", "--out", str(t / "o"),
                                          "--mlflow-uri", f"sqlite:///{t / 'mlflow.db'}"],
            "no-dataset"),
    CliCase("weights missing", lambda t: ["train", "--data", str(make_dataset(t / "ds", size=64)),
                                          "--weights", str(t / "gone.pt"), "--out", str(t / "o"),
                                          "--mlflow-uri", f"sqlite:///{t / 'mlflow.db'}"],
            "gone.pt"),
    CliCase("mining truth broken", lambda t: [
        "mine", "--scene", str(_scene(t / "in")[0]), "--truth",
        str((t / "bad.geojson", (t / "bad.geojson").write_text('{"type": "Feature"}'))[0]),
        "--out", str(t / "hard"), "--pred", str(_scene(t / "in2", seed=2)[1]),
        "--classes", "car,truck"], "bad.geojson"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_bad_input_on_the_command_line_gets_one_clear_message(case: CliCase,
                                                               tmp_path: Path) -> None:
    args = case.make(tmp_path)
    proc = subprocess.run([AUTORETRAIN, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors, output[-3000:]
    assert case.names in " ".join(errors), errors


class _ConnectionRecorder:
    """An HTTP(S) proxy on 127.0.0.1 that records every connection and answers none."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()


@pytest.mark.parametrize("command", ["train", "detect"])
def test_weights_named_by_a_bare_file_name_are_refused_never_downloaded(
        command: str, tmp_path: Path) -> None:
    """``yolo11n.pt`` is what Ultralytics downloads when it is missing; AutoRetrain loads
    weights only from a file, storage or the registry. Ultralytics' offline switch is off here,
    and every HTTP(S) request goes to a proxy that counts them."""
    import os

    args = (["train", "--data", str(make_dataset(tmp_path / "ds", size=64)), "--out",
             str(tmp_path / "o"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--weights", "yolo11n.pt"] if command == "train" else
            ["detect", str(_scene(tmp_path / "in")[0]), "--out", str(tmp_path / "o.geojson"),
             "--model", "yolo11n.pt"])
    proxy = _ConnectionRecorder()
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}
    env.update({"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "http_proxy": proxy.url,
                "https_proxy": proxy.url, "NO_PROXY": "", "no_proxy": ""})
    cwd = tmp_path / "empty"
    cwd.mkdir()
    try:
        proc = subprocess.run([AUTORETRAIN, *args], capture_output=True, text=True,
                              timeout=300, cwd=cwd, env=env, check=False)
    finally:
        proxy.close()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "error: yolo11n.pt: model weights file not found; weights are never downloaded" \
        in output, output[-3000:]
    assert proxy.connections == 0
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing fetched into the folder


# --------------------------------------------------------------------------- a cycle's ingest


def _nan_labels(_scene_path: Path, labels: Path) -> None:
    _edit_labels(labels, _set_first_coordinate(math.nan))


DROP_CASES: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    # drop id: (how its one scene pair is broken, the file named, what the reason says)
    "no-labels": (lambda _s, lab: lab.unlink(), "s0.tif", "no annotation file"),
    "no-scene": (lambda s, _l: s.unlink(), "s0.geojson", "annotations without a scene"),
    "corrupt-scene": (lambda s, _l: s.write_bytes(b"II*\x00" + b"\x00" * 64), "s0.tif",
                      "cannot open"),
    "truncated-scene": (lambda s, _l: _truncate(s), "s0.tif", ""),
    "no-crs": (lambda s, _l: _no_crs_scene(s), "s0.tif", "the raster has no CRS"),
    "labels-not-json": (lambda _s, lab: lab.write_text("{oops"), "s0.geojson",
                        "not valid JSON"),
    "nan-coordinate": (_nan_labels, "s0.geojson", "got NaN; expected a finite number"),
    "string-coordinate": (lambda _s, lab: _edit_labels(lab, _set_first_coordinate("12")),
                          "s0.geojson", 'got "12"; expected a number'),
    "unknown-class": (lambda _s, lab: _edit_labels(lab, lambda d: d["features"][0][
        "properties"].update({"class": "tank"})), "s0.geojson", "unknown class 'tank'"),
    "no-class": (lambda _s, lab: _edit_labels(lab, lambda d: d["features"][0].update(
        {"properties": {}})), "s0.geojson", "feature 0"),
    "outside": (lambda _s, lab: _edit_labels(lab, lambda d: [f["geometry"].update(
        {"coordinates": [[[x + 1e6, y] for x, y in f["geometry"]["coordinates"][0]]]})
        for f in d["features"]]), "s0.geojson", "overlaps scene s0.tif"),
    "point-geometry": (lambda _s, lab: _edit_labels(lab, lambda d: d["features"][0].update(
        {"geometry": {"type": "Point", "coordinates": [1, 2]}})), "s0.geojson",
        "is not polygonal"),
    "stray-file": (lambda s, _l: (s.parent / "notes.docx").write_bytes(b"x"), "notes.docx",
                   "unexpected file"),
    "bad-metadata": (lambda s, _l: (s.parent / "drop.json").write_text('{"regoin": 1}'),
                     "drop.json", "unknown key(s) regoin"),
    "metadata-not-json": (lambda s, _l: (s.parent / "drop.json").write_text("{"),
                          "drop.json", "not valid JSON"),
    "nested-folder": (lambda s, _l: ((s.parent / "sub").mkdir(),
                                     (s.parent / "sub" / "x.tif").write_bytes(b"1")),
                      "sub/x.tif", "sub-folders are not allowed"),
}


def _every_byte(storage: Storage) -> list[bytes]:
    return [storage.get_bytes(key) for key in storage.list()]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bad_drops_are_quarantined_with_reasons_and_nothing_is_lost(
        backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from retrain_lib.cycle.data import ingest
    from retrain_lib.cycle.settings import CycleSettings

    cfg = parse_object_type_config(VALID_CONFIG)
    dropped: dict[str, dict[str, bytes]] = {}
    with storage_backend(backend_name, tmp_path, request) as backend:
        storage = backend.storage()
        for drop_id, (break_it, _file, _says) in {**DROP_CASES, "good": (
                lambda _s, _l: None, "", "")}.items():
            folder = tmp_path / "drops" / drop_id
            scene, labels = _scene(folder, seed=len(dropped) + 1)
            break_it(scene, labels)
            dropped[drop_id] = {p.relative_to(folder).as_posix(): p.read_bytes()
                                for p in folder.rglob("*") if p.is_file()}
            put_folder(storage, folder, f"incoming/vehicle/{drop_id}")
        settings = CycleSettings(storage_uri=backend.storage_uri, s3=backend.s3,
                                 mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 scratch=str(tmp_path / "scratch"))
        summary = ingest(cfg, settings, "c1")

        outcomes = {d.drop_id: d for d in summary.drops}
        assert outcomes["good"].status == "cataloged"
        assert summary.quarantined == len(DROP_CASES)
        for drop_id, (_break, file, says) in DROP_CASES.items():
            reason = storage.get_json(f"quarantine/vehicle/{drop_id}/reason.json")
            problems = [p for p in reason["problems"] if p["file"] == file]
            assert problems and says in problems[0]["problem"], (drop_id, reason["problems"])
            for problem in reason["problems"]:
                assert "Traceback" not in problem["problem"]
                assert "autoretrain-ingest-" not in problem["problem"]  # no scratch paths
        # Every byte dropped is still under the root: in quarantine, or in the catalog.
        kept = _every_byte(storage)
        for drop_id, files in dropped.items():
            for name, data in files.items():
                if drop_id != "good":
                    assert storage.get_bytes(f"quarantine/vehicle/{drop_id}/{name}") == data
                else:
                    assert data in kept or name.endswith(".geojson")  # labels normalised
        assert storage.list("incoming/") == []


# --------------------------------------------------------------------------- generated input

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
_NESTED = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5), max_leaves=24)
_GEOMETRY = st.one_of(
    _NESTED,
    st.fixed_dictionaries({"type": st.sampled_from(
        ["Polygon", "MultiPolygon", "Point", "LineString", "GeometryCollection", "Circle",
         "polygon", ""]), "coordinates": _NESTED}),
    st.fixed_dictionaries({"type": st.just("GeometryCollection"),
                           "geometries": st.lists(_NESTED, max_size=3)}),
    st.dictionaries(st.text(max_size=6), _NESTED, max_size=3),
)
_PROPERTIES = st.one_of(_SCALARS, st.dictionaries(
    st.sampled_from(["class", "id", "score", "x"]), _SCALARS, max_size=3))
_FEATURE = st.one_of(_NESTED, st.fixed_dictionaries(
    {"type": st.sampled_from(["Feature", "feature", "Polygon"])},
    optional={"geometry": _GEOMETRY, "properties": _PROPERTIES, "id": _SCALARS}))
_DOCUMENT = st.one_of(_NESTED, st.fixed_dictionaries(
    {"type": st.sampled_from(["FeatureCollection", "Feature", "Polygon", "Topology"])},
    optional={"features": st.one_of(_NESTED, st.lists(_FEATURE, max_size=4)),
              "geometry": _GEOMETRY, "properties": _PROPERTIES,
              "crs": st.one_of(_SCALARS, st.fixed_dictionaries(
                  {"type": st.just("name"), "properties": st.fixed_dictionaries(
                      {"name": st.sampled_from(["EPSG:32633", "urn:ogc:def:crs:EPSG::4326",
                                                "EPSG:0", "nonsense"])})}))}))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=_DOCUMENT)
def test_malformed_geojson_is_an_input_error_naming_the_file(document: Any,
                                                             tmp_path: Path) -> None:
    from retrain_lib.geo.annotations import load_annotations
    from retrain_lib.geo.geojson import read_geojson
    from retrain_lib.geo.raster import inspect_scene

    path = tmp_path / "generated.geojson"
    path.write_text(json.dumps(document))
    try:
        read_geojson(path)
    except InputError as exc:
        assert str(path) in str(exc) and "Traceback" not in str(exc)
    scene_path = tmp_path / "scene" / "s0.tif"
    if not scene_path.exists():
        _scene(scene_path.parent)
    cfg = parse_object_type_config(VALID_CONFIG)
    try:
        load_annotations(path, inspect_scene(scene_path, "s0"), cfg.class_mapper)
    except InputError as exc:
        assert "generated.geojson" in str(exc)


def _config_keys(model: Any = None, prefix: str = "") -> list[str]:
    """Every field path of the config models, e.g. ``training.epochs``."""
    from pydantic import BaseModel

    from retrain_lib.core.config import ObjectTypeConfig

    model = model or ObjectTypeConfig
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _config_keys(annotation, f"{prefix}{name}.")
    return keys


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(_config_keys()), value=_NESTED,
       extra=st.dictionaries(st.text(min_size=1, max_size=6), _SCALARS, max_size=2))
def test_malformed_configs_are_config_errors_naming_the_field(key: str, value: Any,
                                                              extra: dict[str, Any]) -> None:
    data: dict[str, Any] = json.loads(json.dumps(VALID_CONFIG))
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    data.update({k: v for k, v in extra.items() if k not in data})
    try:
        parse_object_type_config(data, "vehicle.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("vehicle.yaml") and "Traceback" not in message
        named = [k for k in (key, *extra) if k.split(".")[-1] in message]
        assert named, message


def test_the_reliability_report_counts_what_the_suite_runs() -> None:
    text = (REPO_ROOT / "docs" / "reliability.md").read_text()
    counts = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|", text, flags=re.M))
    assert int(counts["bad inputs on the command line"]) == len(CLI_CASES)
    assert int(counts["bad drops through a cycle's ingest, per backend"]) == len(DROP_CASES)
    assert int(counts["generated GeoJSON documents per run"]) == 150
    assert int(counts["generated configs per run"]) == 200
    assert int(counts["kill -9 points in a whole cycle, local storage"]) == len(CRASH_POINTS)
    assert int(counts["kill -9 points in a whole cycle, S3"]) == len(S3_CRASH_POINTS)
    # + the Docker engine (tests/training) and a Celery worker (tests/devtools/test_service_stack)
    assert int(counts["services stopped during a cycle"]) == len(OUTAGES) + 2


def test_yaml_is_only_read_with_the_safe_loader() -> None:
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\(|Loader=")
    offenders = [f"{path.relative_to(REPO_ROOT)}:{n}" for folder in ("retrain_lib", "dags",
                                                                      "plugins")
                 for path in sorted((REPO_ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if unsafe.search(line)]
    assert offenders == []


def test_a_config_that_tries_to_run_code_is_refused(tmp_path: Path) -> None:
    from retrain_lib.core.config import load_object_type_config

    marker = tmp_path / "ran"
    path = tmp_path / "vehicle.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                    "classes: [car]\n")
    with pytest.raises(ConfigError, match=r"vehicle\.yaml: not valid YAML"):
        load_object_type_config(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- names as paths

ESCAPING_CLASSES = ["../../escaped", "/etc/passwd", "a\\b", "c" * 64]


def test_class_names_and_scene_names_never_become_paths_out_of_the_root(tmp_path: Path) -> None:
    """Class names and scene file names that look like paths are data, never path parts:
    a drop is cataloged, tiled and assembled, and every file written stays under the root."""
    from retrain_lib.core.layout import CATALOG_MANIFEST
    from retrain_lib.cycle.data import assemble, ingest, scenes_to_tile, tile_one
    from retrain_lib.cycle.settings import CycleSettings
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    cfg = parse_object_type_config({**VALID_CONFIG, "classes": ESCAPING_CLASSES,
                                    "tiling": {"tile_size": 128}})
    root = tmp_path / "root"
    drop = root / "incoming" / "vehicle" / "d1"
    stems = ["..s0", "s1..", "scène ../ 2"[:8]]
    make_drop(drop, [SceneSpec(scene_id=f"s{n}", width=256, height=256,
                               classes=ESCAPING_CLASSES, objects_per_class=2, seed=n)
                     for n in range(len(stems))])
    for n, stem in enumerate(stems):  # analysts name their files as they like
        for suffix in (".tif", ".geojson"):
            (drop / f"s{n}{suffix}").rename(drop / f"{stem}{suffix}")
    (drop / "drop.json").write_text(json.dumps({"region": "../../region"}))
    settings = CycleSettings(storage_uri=str(root), scratch=str(tmp_path / "scratch"))
    summary = ingest(cfg, settings, "c1")
    assert summary.cataloged == 1, summary.drops
    for scene_id in scenes_to_tile(cfg, settings):
        tile_one(cfg, settings, scene_id)
    dataset = assemble(cfg, settings, "c1")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "scratch"]
    for folder in (root, tmp_path / "scratch"):
        for path in folder.rglob("*"):
            resolved = path.resolve()
            assert resolved.is_relative_to(folder.resolve()), path
            assert ".." not in path.relative_to(folder).parts, path
            assert not any(name in str(path) for name in ESCAPING_CLASSES), path
    scenes = sorted(p.parent.name for p in (root / "catalog").rglob(CATALOG_MANIFEST))
    assert scenes == ["d1-..s0", "d1-s1", "d1-sc-ne"], scenes
    data = yaml_names(root / dataset.data_yaml_key)
    assert data == ESCAPING_CLASSES  # the names themselves, unchanged, as data


def yaml_names(path: Path) -> list[str]:
    import yaml

    names = yaml.safe_load(path.read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
