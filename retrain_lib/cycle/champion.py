"""The registered model of an object type, as the stages of a cycle see it."""

from __future__ import annotations

from retrain_lib.core.config import ObjectTypeConfig
from retrain_lib.cycle.settings import CycleSettings
from retrain_lib.stages.inference import Detector, load_detector
from retrain_lib.stages.registry import ModelRegistry

__all__ = ["champion_detector", "registry", "version_detector", "version_uri"]


def registry(cfg: ObjectTypeConfig, settings: CycleSettings) -> ModelRegistry:
    """The object type's registered model in the cycle's MLflow."""
    return ModelRegistry(cfg.registered_model_name, settings.tracking_uri)


def version_uri(cfg: ObjectTypeConfig, version: str) -> str:
    """``models:/<name>/<version>``: a pinned version, not the moving alias."""
    return f"models:/{cfg.registered_model_name}/{version}"


def version_detector(cfg: ObjectTypeConfig, settings: CycleSettings, version: str) -> Detector:
    """A registered version, loaded for inference on the configured device."""
    return load_detector(version_uri(cfg, version), device=cfg.training.device,
                         tracking_uri=settings.tracking_uri)


def champion_detector(cfg: ObjectTypeConfig, settings: CycleSettings, cycle_id: str
                      ) -> tuple[str, Detector] | None:
    """The version cycle ``cycle_id`` is measured against and a loaded detector, or None
    before the first champion (see :meth:`ModelRegistry.champion_for_cycle`).

    The version is pinned, so an alias moved meanwhile cannot swap the model under a stage.

    Raises:
        RegistryUnavailable: MLflow did not answer (never read as "no champion").
    """
    champion = registry(cfg, settings).champion_for_cycle(cycle_id)
    if champion is None:
        return None
    return champion.version, version_detector(cfg, settings, champion.version)
