"""The kubernetes runner without a cluster: the pod it renders, checked against the Kubernetes
schema (kubernetes-validate, strict: an unknown field is an error) and a golden file, as the
KubernetesPodOperator itself renders it, and its command line run for real.

No cluster runs here, so nothing starts a pod: the last test runs the pod's container
arguments with the same entrypoint in a local process instead, which proves that the pod's
command line trains and writes the result the operator reads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from retrain_lib.core.config import KubernetesRunnerConfig, RunnerConfig
from retrain_lib.core.errors import ConfigError
from retrain_lib.core.storage import S3Settings
from retrain_lib.training.contract import TrainRequest
from retrain_lib.training.runners import run_training
from retrain_lib.training.runners.environment import TrainingEnvironment
from retrain_lib.training.runners.kubernetes import (
    CONTAINER_NAME,
    POD_RESULT_FILE,
    pod_manifest,
)
from tests.training.test_train import NAMES, make_dataset

GOLDEN = Path(__file__).parent / "golden" / "trainer_pod.json"
KUBERNETES_VERSION = "1.33.0"
SECRET = "s3cr3t-planted-by-the-test"

GPU_CONFIG = KubernetesRunnerConfig.model_validate({
    "image": "registry.example/autoretrain-trainer:1.2", "namespace": "ml",
    "gpus": 1, "cpu": "4", "memory": "16Gi", "shm_size": "4Gi",
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "secrets": ["autoretrain-s3", "autoretrain-mlflow"], "scratch_claim": "trainer-scratch",
    "service_account_name": "autoretrain-trainer"})
REQUEST = TrainRequest(data="s3://autoretrain/data/datasets/vehicle/ds-1", weights=(
    "models:/autoretrain-vehicle/3"), out="s3://autoretrain/data/models/vehicle/c1-a",
    epochs=30, imgsz=640, batch=16, device="0", classes=["car", "truck"],
    object_type="vehicle", cycle_id="2025-06-01T00-00-00Z", candidate="a",
    mlflow_uri="http://mlflow:5000")
ENVIRONMENT = TrainingEnvironment.build(
    s3=S3Settings(endpoint_url="http://minio:9000", region_name="us-east-1",
                  aws_access_key_id="AKIA-planted", aws_secret_access_key=SECRET),
    mlflow_uri="http://mlflow:5000", mlflow_password=SECRET)


def _rendered(manifest: dict[str, Any], config: KubernetesRunnerConfig = GPU_CONFIG
              ) -> dict[str, Any]:
    """The pod the KubernetesPodOperator would submit for ``manifest``, as JSON."""
    from kubernetes.client import ApiClient

    from retrain_lib.airflow.kubernetes import pod_operator

    pod = pod_operator(config, manifest).build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)  # type: ignore[no-any-return]


def test_the_pod_matches_the_golden_file() -> None:
    manifest = pod_manifest(GPU_CONFIG, REQUEST, environment=ENVIRONMENT)
    if os.environ.get("AUTORETRAIN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert manifest == json.loads(GOLDEN.read_text()), (
        "the trainer pod changed; if on purpose, rerun with AUTORETRAIN_UPDATE_GOLDEN=1 and "
        "review the diff")


@pytest.mark.parametrize("config", [GPU_CONFIG, KubernetesRunnerConfig()])
def test_the_pod_and_the_operators_rendering_pass_the_kubernetes_schema(
        config: KubernetesRunnerConfig) -> None:
    request = REQUEST if config.gpus else REQUEST.model_copy(update={"device": "cpu"})
    manifest = pod_manifest(config, request, environment=ENVIRONMENT)
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    rendered = _rendered(manifest, config)
    kubernetes_validate.validate(rendered, KUBERNETES_VERSION, strict=True)
    # The operator keeps what the runner asked for, and adds its result sidecar.
    [base] = [c for c in rendered["spec"]["containers"] if c["name"] == CONTAINER_NAME]
    assert base["args"] == manifest["spec"]["containers"][0]["args"]
    assert base["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(c["name"] == "airflow-xcom-sidecar" for c in rendered["spec"]["containers"])
    assert rendered["metadata"]["namespace"] == config.namespace
    assert manifest["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()
    # The check can fail: a misspelt field, or a wrong type, is refused.
    for broken in ({"resourcez": {}}, {"args": "--data x"}):
        bad = json.loads(json.dumps(manifest))
        bad["spec"]["containers"][0].update(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_gpus_node_selector_and_tolerations_reach_the_pod() -> None:
    rendered = _rendered(pod_manifest(GPU_CONFIG, REQUEST, environment=ENVIRONMENT))
    spec = rendered["spec"]
    [base] = [c for c in spec["containers"] if c["name"] == CONTAINER_NAME]
    assert base["resources"] == {"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
                                 "requests": {"cpu": "4", "memory": "16Gi"}}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "autoretrain-trainer"
    assert {"name": "scratch", "persistentVolumeClaim": {"claimName": "trainer-scratch"}} in (
        spec["volumes"])


def test_credentials_come_from_secrets_never_from_the_spec() -> None:
    manifest = pod_manifest(GPU_CONFIG, REQUEST, environment=ENVIRONMENT)
    text = json.dumps(_rendered(manifest))
    assert SECRET not in text and "AKIA-planted" not in text
    [base] = manifest["spec"]["containers"]
    assert base["envFrom"] == [{"secretRef": {"name": "autoretrain-s3"}},
                               {"secretRef": {"name": "autoretrain-mlflow"}}]
    env = {e["name"]: e["value"] for e in base["env"]}
    assert env["AUTORETRAIN_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--mlflow-uri" not in base["args"]
    # A tracking URI with a password in it cannot go into a pod spec.
    leaky = TrainingEnvironment.build(mlflow_uri=f"http://user:{SECRET}@mlflow:5000")
    with pytest.raises(ConfigError, match=r"embeds credentials.*runner\.kubernetes\.secrets"):
        pod_manifest(GPU_CONFIG, REQUEST, environment=leaky)
    # And the config has no place for one: unknown keys are errors.
    with pytest.raises(ValueError, match="aws_secret_access_key"):
        KubernetesRunnerConfig.model_validate({"aws_secret_access_key": SECRET})


def test_a_gpu_device_without_gpus_and_a_runner_without_airflow_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"runner.kubernetes.gpus: 0"):
        pod_manifest(KubernetesRunnerConfig(), REQUEST, environment=ENVIRONMENT)
    with pytest.raises(ConfigError, match="starts its pods from an Airflow task"):
        run_training(REQUEST, RunnerConfig(kind="kubernetes"), environment=ENVIRONMENT)


@pytest.mark.slow
def test_the_pods_command_line_trains_and_writes_the_result(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "dsv-pod", size=64)
    request = TrainRequest(data=str(dataset), weights="yolo11n.yaml", out=str(tmp_path / "out"),
                           epochs=1, imgsz=64, batch=4, plots=False, classes=list(NAMES),
                           object_type="vehicle", cycle_id="pod-cycle",
                           mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    environment = TrainingEnvironment.build(mlflow_uri=request.mlflow_uri)
    result_file = tmp_path / "xcom" / "return.json"
    scratch = tmp_path / "scratch"

    def launch(manifest: dict[str, Any]) -> dict[str, Any]:
        """What the pod's container does, in a local process: the image's entrypoint with the
        pod's arguments and environment; /airflow/xcom and /scratch mapped to folders."""
        [container] = manifest["spec"]["containers"]
        args = [str(result_file) if a == POD_RESULT_FILE else
                str(scratch) if a == "/scratch" else a for a in container["args"]]
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
        proc = subprocess.run([sys.executable, "-m", "retrain_lib.training", *args], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(result_file.read_text())  # type: ignore[no-any-return]

    result = run_training(request, RunnerConfig(kind="kubernetes"), environment=environment,
                          launch_pod=launch)
    assert result.epochs_run == 1 and Path(result.weights_uri).is_file()
    assert result.weights_uri.startswith(str(tmp_path / "out"))
