"""docker-compose.yml cannot be started here (no image registry), so check its consistency."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"


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
            if source.startswith((".", "/")):
                path = REPO_ROOT / source
                assert path.exists(), f"{name} mounts missing file {source}"
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
    from retrain_lib import storage

    example = ENV_EXAMPLE.read_text()
    assert storage.ENV_S3_ENDPOINT in example
