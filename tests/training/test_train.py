"""The training entrypoint: real Ultralytics training on tiny chips, real MLflow, real S3 (moto)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrain_lib.cli import app
from retrain_lib.core.errors import ConfigError, InputError, StorageError
from retrain_lib.stages.weights import WEIGHTS_IN_RUN
from retrain_lib.training.contract import TrainRequest, TrainResult, parse_result_line
from retrain_lib.training.fit import train_model
from retrain_lib.training.runners.local import LocalRunner
from retrain_lib.training.sources import prepare_dataset
from tests.conftest import free_port

NAMES = ("car", "truck")
FAST = {"epochs": 1, "imgsz": 64, "batch": 4, "plots": False}


def make_dataset(root: Path, names: tuple[str, ...] = NAMES, n_train: int = 12, n_val: int = 4,
                 size: int = 96, seed: int = 0, labels: bool = True) -> Path:
    """A dataset version folder: data.yaml, train/val lists, images/ and labels/ per scene.

    Objects are filled rectangles (class 0 small and red, class 1 wide and blue, class 2 green)
    on plain backgrounds, saved as PNG chips with YOLO labels.
    """
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40)]
    for split, count in (("train", n_train), ("val", n_val)):
        entries = []
        for i in range(count):
            image = np.full((size, size, 3), rng.integers(60, 120, 3), np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, len(names)))
                w, h = (int(rng.integers(10, 20)), int(rng.integers(10, 20))) if cls == 0 else (
                    int(rng.integers(22, 34)), int(rng.integers(10, 16)))
                x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                image[y0:y0 + h, x0:x0 + w] = colours[cls]
                lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} "
                             f"{w / size:.6f} {h / size:.6f}")
            rel = f"images/scene{i % 3}/{split}_{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / rel)
            if labels:
                label = root / rel.replace("images/", "labels/").replace(".png", ".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("\n".join(lines) + "\n")
            entries.append(rel)
        (root / f"{split}.txt").write_text("".join(f"./{e}\n" for e in entries))
    (root / "data.yaml").write_text(
        "# dataset version contract: lists relative to this folder\n"
        f"train: train.txt\nval: val.txt\nnc: {len(names)}\nnames: [{', '.join(names)}]\n")
    return root


def upload_folder(folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AUTORETRAIN_S3_ENDPOINT_URL"])
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "datasets" / "vehicle" / "dsv-0001")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tracking database per module (creating one costs seconds); tests use experiments."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the schema once
    return uri


@pytest.fixture()
def experiment(request: pytest.FixtureRequest) -> str:
    """An MLflow experiment of this test alone."""
    return request.node.name[:200]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory,
            mlflow_uri: str) -> tuple[TrainRequest, TrainResult]:
    """One in-process training of 1 epoch; later tests warm-start from its weights."""
    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "datasets" / "vehicle" / "dsv-base")
    request = TrainRequest(
        data=str(data), weights="yolo11n.yaml", out=str(root / "models" / "base"),
        mlflow_uri=mlflow_uri, experiment="trained-base", scratch=str(root / "scratch"),
        object_type="vehicle", classes=list(NAMES), cycle_id="cycle-1", **FAST)
    return request, train_model(request)


# -- request ------------------------------------------------------------------------------


def test_request_lifts_candidate_overrides_and_rejects_unknown_ones() -> None:
    request = TrainRequest.parse({"data": "d", "weights": "w.pt", "out": "o",
                                  "params": {"epochs": 3, "lr0": 0.002}})
    assert request.epochs == 3 and request.params == {"lr0": 0.002}
    with pytest.raises(ConfigError, match=r"params: .*unknown training argument\(s\) lr00"):
        TrainRequest.parse({"data": "d", "weights": "w.pt", "out": "o",
                            "params": {"lr00": 0.1}})
    with pytest.raises(ConfigError, match=r"params\.epochs=3 contradicts epochs=5"):
        TrainRequest.parse({"data": "d", "weights": "w.pt", "out": "o", "epochs": 5,
                            "params": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"weights: got 'w\.onnx'"):
        TrainRequest.parse({"data": "d", "weights": "w.onnx", "out": "o"})
    with pytest.raises(ConfigError, match="device: got 'gpu'"):
        TrainRequest.parse({"data": "d", "weights": "w.pt", "out": "o", "device": "gpu"})


def test_request_identity_ignores_scratch_only() -> None:
    base = TrainRequest(data="d", weights="w.pt", out="o")
    assert base.identity() == base.model_copy(update={"scratch": "/x"}).identity()
    assert base.identity() != base.model_copy(update={"epochs": 31}).identity()


def test_result_line_is_found_after_stray_output() -> None:
    result = TrainResult(mlflow_run_id="r", weights_uri="s3://b/w.pt", metrics={"map50": 0.5},
                         epochs_run=2, wall_time_s=1.0, resumed=False, classes=("car",))
    assert parse_result_line(f"log\n{result.to_line()}\nwarning at exit\n") == result


# -- dataset contract and bad input --------------------------------------------------------


def test_prepare_dataset_lays_out_chips_for_ultralytics(dataset: Path, tmp_path: Path) -> None:
    # Chips may live outside the version folder (shared chip store) and repeat (oversampling).
    (tmp_path / "datasets" / "chips").mkdir()
    (dataset / "images" / "scene2").rename(tmp_path / "datasets" / "chips" / "images")
    (dataset / "labels" / "scene2").rename(tmp_path / "datasets" / "chips" / "labels")
    train = (dataset / "train.txt").read_text().replace("./images/scene2/",
                                                        "../../chips/images/")
    val = (dataset / "val.txt").read_text().replace("./images/scene2/", "../../chips/images/")
    (dataset / "val.txt").write_text(val)
    repeated = train.splitlines()[0] + "\n"
    (dataset / "train.txt").write_text(train + repeated)
    once = prepare_dataset(str(dataset), tmp_path / "once", NAMES)
    (dataset / "train.txt").write_text(train + repeated * 3)

    summary = prepare_dataset(str(dataset / "data.yaml"), tmp_path / "scratch", NAMES)

    assert summary.version == "dsv-0001"
    assert (summary.train_images, summary.val_images) == (15, 4)
    label_of_repeat = len(Path(dataset, repeated.strip().replace("images", "labels", 1))
                          .with_suffix(".txt").read_text().splitlines())
    assert sum(summary.train_instances) == sum(once.train_instances) + 2 * label_of_repeat
    listed = summary.data_yaml.parent.joinpath("train.txt").read_text().split()
    first = Path(listed[0])
    # Chips are symlinked, labels sit where Ultralytics looks for them, and no cache or
    # other file is written into the immutable dataset version.
    assert first.is_absolute() and first.is_symlink() and first.resolve().is_relative_to(dataset)
    assert Path(str(first).replace("/images/", "/labels/")).with_suffix(".txt").is_file()
    shared = [Path(p) for p in listed if "/_up/" in p]
    assert len(shared) == 4 and all(p.resolve().is_relative_to(tmp_path / "datasets" / "chips")
                                    for p in shared)
    assert not list(dataset.rglob("*.cache"))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: [p.unlink() for p in d.rglob("*.txt") if "labels" in p.parts],
     "the dataset has no labels"),
    (lambda d: [p.write_text("") for p in d.rglob("*.txt") if "labels" in p.parts],
     "contain no objects"),
    (lambda d: next(p for p in sorted(d.rglob("*.txt")) if "labels" in p.parts)
     .write_text("2 0.5 0.5 0.1 0.1\n"), "class id 2 but the dataset has 2 class"),
    (lambda d: (d / "data.yaml").write_text("train: train.txt\nval: val.txt\nnc: 3\n"
                                            "names: [car, truck]\n"), "nc is 3 but names lists 2"),
    (lambda d: (d / "data.yaml").write_text("train: train.txt\nval: val.txt\n"
                                            "names: [car, truck, bus]\n"),
     r"classes \[car, truck, bus\] differ from the object type's classes \[car, truck\]"),
    (lambda d: (d / "val.txt").write_text("./images/scene9/missing.png\n"),
     "1 listed image\\(s\\) do not exist"),
    (lambda d: (d / "val.txt").write_text("chips/a.png\n"), "not inside a folder named 'images'"),
    (lambda d: (d / "data.yaml").write_text("train: train.txt\nnames: [car, truck]\n"),
     "'val' is missing"),
])
def test_bad_datasets_are_refused_with_the_reason(dataset: Path, tmp_path: Path, mutate,
                                                   message: str) -> None:
    mutate(dataset)
    with pytest.raises(InputError, match=message):
        prepare_dataset(str(dataset), tmp_path / "scratch", NAMES)


def test_dataset_from_s3_is_downloaded(dataset: Path, tmp_path: Path, s3_bucket: str) -> None:
    upload_folder(dataset, s3_bucket, "datasets/vehicle/dsv-0001")
    summary = prepare_dataset(f"s3://{s3_bucket}/datasets/vehicle/dsv-0001", tmp_path / "s",
                              NAMES)
    local = prepare_dataset(str(dataset), tmp_path / "l", NAMES)
    assert summary.version == "dsv-0001"
    assert summary.train_instances == local.train_instances
    listed = Path(summary.data_yaml.parent / "val.txt").read_text().split()
    assert all(Path(p).is_file() and not Path(p).is_symlink() for p in listed)


def test_unreachable_storage_is_a_storage_error(dataset: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StorageError, match="unreachable"):
        prepare_dataset("s3://nowhere/datasets/vehicle/dsv-0001", tmp_path / "s", NAMES)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(("case", "code", "message"), [
    ("no-labels", 2, "has no labels"),
    ("class-count", 2, "class-count"),
    ("cuda", 2, "CUDA"),
    ("storage", 1, "cannot be reached|unreachable"),
    ("no-mlflow", 2, "no MLflow tracking URI"),
])
def test_cli_bad_input_exits_non_zero_with_one_message(
        case: str, code: int, message: str, dataset: Path, tmp_path: Path, mlflow_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--data", str(dataset), "--weights", "yolo11n.yaml", "--out", str(tmp_path / "out"),
            "--scratch", str(tmp_path / "scratch"), "--mlflow-uri", mlflow_uri,
            "--classes", "car,truck", "--epochs", "1", "--imgsz", "64"]
    if case == "no-labels":
        for label in dataset.rglob("*.txt"):
            if "labels" in label.parts:
                label.unlink()
    elif case == "class-count":
        args[args.index("--classes") + 1] = "car,truck,bus"
    elif case == "cuda":
        args += ["--device", "63"]  # no machine has 64 GPUs, and CPU-only ones have none
    elif case == "storage":
        monkeypatch.setenv("AUTORETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        args[args.index("--out") + 1] = "s3://models-bucket/vehicle/run1"
    elif case == "no-mlflow":
        args = args[:args.index("--mlflow-uri")] + args[args.index("--mlflow-uri") + 2:]
    exit_code, output = _cli(*args)
    assert exit_code == code, output
    assert "error:" in output and "Traceback" not in output
    assert __import__("re").search(message, output), output


# -- training ------------------------------------------------------------------------------


def test_mlflow_one_run_and_nothing_in_the_working_directory(
        dataset: Path, tmp_path: Path, mlflow_uri: str, experiment: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the local runner, with cwd = an empty folder.

    The name contains 'test_mlflow' on purpose: Ultralytics' own MLflow callback stays quiet
    under pytest unless the test name says so, and this test must see it if it were active.
    """
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from ultralytics import YOLO

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.train.local")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    request = TrainRequest(data=str(dataset), weights="yolo11n.yaml",
                           out=str(tmp_path / "models" / "run-1"), mlflow_uri=mlflow_uri,
                           experiment=experiment, scratch=str(tmp_path / "scratch"),
                           object_type="vehicle",
                           classes=list(NAMES), cycle_id="c-7", candidate="low-lr",
                           parent_model_version="3", params={"lr0": 0.002},
                           **{**FAST, "epochs": 2})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = LocalRunner(cwd=workdir, env=env, logger=logger).run(request)

    assert sorted(os.listdir(workdir)) == []  # no mlruns/, runs/, mlflow.db, yolo11n.pt
    assert any("epochs completed" in line for line in lines)  # output streamed to the logger
    assert result.epochs_run == 2 and not result.resumed
    assert set(result.metrics) == {"map50_95", "map50", "precision", "recall"}
    assert result.weights_uri == str(tmp_path / "models" / "run-1" / WEIGHTS_IN_RUN)
    out = tmp_path / "models" / "run-1"
    assert {"results.csv", "result.json", "request.json"} <= set(os.listdir(out))
    assert json.loads((out / "result.json").read_text())["mlflow_run_id"] == result.mlflow_run_id
    # The entrypoint parsed the runner's arguments back into the very same request.
    assert (tmp_path / "scratch" / f"train-{request.identity()[:20]}" / "state.json").is_file()

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "vehicle-low-lr-c-7"
    assert {k: run.data.tags[k] for k in ("object_type", "dataset_version", "cycle_id",
                                          "parent_model_version", "candidate")} == {
        "object_type": "vehicle", "dataset_version": "dsv-0001", "cycle_id": "c-7",
        "parent_model_version": "3", "candidate": "low-lr"}
    assert run.data.tags["code_version"].startswith(__import__("retrain_lib").__version__)
    assert run.data.params["lr0"] == "0.002" and run.data.params["epochs"] == "2"
    assert "save_period" not in run.data.params  # Ultralytics' callback would log all its args
    for key in ("epoch", "val/map50_95", "train/box_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]

    # The layout a model version is registered from: source = the run's artifact root.
    client.create_registered_model(model := f"autoretrain-{experiment[-40:]}")
    client.create_model_version(model, result.model_source, run_id=result.mlflow_run_id)
    client.set_registered_model_alias(model, "champion", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # the registry follows it
    monkeypatch.chdir(tmp_path)
    local = download_artifacts(artifact_uri=f"models:/{model}@champion/{WEIGHTS_IN_RUN}",
                               dst_path=str(tmp_path / "dl"))
    assert YOLO(local).names == dict(enumerate(NAMES))

    # ... and a later training warm-starts from it by name (parent version tagged for free).
    warm = TrainRequest(**{**request.model_dump(), "weights": f"models:/{model}@champion",
                           "parent_model_version": None, "epochs": 1,
                           "out": str(tmp_path / "models" / "run-2")})
    second = train_model(warm)
    assert client.get_run(second.mlflow_run_id).data.tags["parent_model_version"] == "1"


def test_killed_training_resumes_from_last_checkpoint(dataset: Path, tmp_path: Path,
                                                      mlflow_uri: str, experiment: str) -> None:
    from mlflow import MlflowClient

    request = TrainRequest(data=str(dataset), weights="yolo11n.yaml",
                           out=str(tmp_path / "out"), mlflow_uri=mlflow_uri,
                           experiment=experiment, scratch=str(tmp_path / "scratch"),
                           classes=list(NAMES), **{**FAST, "epochs": 3})
    state_file = tmp_path / "scratch" / f"train-{request.identity()[:20]}" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "retrain_lib.training", *request.to_argv()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    client = MlflowClient(mlflow_uri)
    deadline = time.monotonic() + 120
    try:
        # Kill right after the first epoch is checkpointed and logged, like a lost worker.
        while time.monotonic() < deadline and proc.poll() is None:
            if state_file.is_file():
                run_id = json.loads(state_file.read_text())["mlflow_run_id"]
                if client.get_metric_history(run_id, "epoch"):
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the first attempt ended before it was killed"
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody closed it

    # The retry goes through `autoretrain train`, the same command as `python -m ...`.
    retry = subprocess.run(
        [str(Path(sys.executable).with_name("autoretrain")), "train", *request.to_argv(),
         "--result-file", str(tmp_path / "xcom" / "return.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert retry.returncode == 0, retry.stderr[-3000:]
    result = parse_result_line(retry.stdout.splitlines()[-1:])
    assert TrainResult.from_dict(json.loads((tmp_path / "xcom" / "return.json").read_text())
                                 ) == result
    assert "Resuming training" in retry.stdout

    assert result.resumed and result.epochs_run == 3
    assert result.mlflow_run_id == run_id  # the same run continues
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_retry_after_success_returns_the_stored_result(
        trained: tuple[TrainRequest, TrainResult]) -> None:
    request, first = trained
    again = train_model(request)
    assert again.resumed and again.mlflow_run_id == first.mlflow_run_id
    assert again.weights_uri == first.weights_uri and again.metrics == first.metrics


def test_new_class_adapts_the_head_from_s3(trained: tuple[TrainRequest, TrainResult],
                                           tmp_path: Path, s3_bucket: str, mlflow_uri: str,
                                           experiment: str) -> None:
    """A class was appended: warm start from the 2-class weights, all on S3."""
    from mlflow import MlflowClient
    from ultralytics import YOLO

    _, base = trained
    names = (*NAMES, "bus")
    upload_folder(make_dataset(tmp_path / "dsv-0002", names=names, seed=1), s3_bucket,
                  "datasets/vehicle/dsv-0002")
    upload_folder(Path(base.weights_uri).parent, s3_bucket, "models/vehicle/base/weights")
    request = TrainRequest(
        data=f"s3://{s3_bucket}/datasets/vehicle/dsv-0002/data.yaml",
        weights=f"s3://{s3_bucket}/models/vehicle/base/{WEIGHTS_IN_RUN}",
        out=f"s3://{s3_bucket}/models/vehicle/run-2", mlflow_uri=mlflow_uri,
        experiment=experiment, scratch=str(tmp_path / "scratch"), classes=list(names), **FAST)

    with pytest.raises(InputError, match=r"trained for 2 class\(es\) \[car, truck\] but the "
                       r"dataset has 3 \[car, truck, bus\]; refusing"):
        train_model(request.model_copy(update={"class_mismatch": "refuse"}))

    result = train_model(request)

    assert result.weights_uri == f"s3://{s3_bucket}/models/vehicle/run-2/{WEIGHTS_IN_RUN}"
    assert result.classes == names
    run = MlflowClient(mlflow_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["head_adapted"] == "true"
    import boto3

    local = tmp_path / "best.pt"
    boto3.client("s3", endpoint_url=os.environ["AUTORETRAIN_S3_ENDPOINT_URL"]).download_file(
        s3_bucket, f"models/vehicle/run-2/{WEIGHTS_IN_RUN}", str(local))
    assert YOLO(str(local)).names == dict(enumerate(names))
