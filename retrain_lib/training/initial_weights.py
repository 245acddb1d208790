"""The weights a training starts from: a checkpoint (any source the weights resolver knows)
or an Ultralytics model YAML to train from scratch, and the classes it was trained for."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from retrain_lib.core.errors import InputError
from retrain_lib.stages.weights import resolve_model
from retrain_lib.training.contract import TrainRequest
from retrain_lib.training.sources import DatasetSummary

__all__ = ["InitialWeights", "check_class_change", "resolve_initial_weights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitialWeights:
    """What a training starts from."""

    path: str
    """What Ultralytics loads: a local .pt path or a model YAML (path or built-in name)."""
    names: tuple[str, ...] | None
    """The classes the weights were trained for; None for a model YAML."""
    parent_version: str | None = None
    """The registered model version the weights came from, if any."""


def resolve_initial_weights(spec: str, scratch: Path, tracking_uri: str) -> InitialWeights:
    """The initial weights named by a request's ``weights``: a model YAML, or a checkpoint
    (a path, a storage URI or ``models:/``), downloaded into ``scratch/weights``.

    Raises:
        InputError: the YAML or checkpoint is missing or not an Ultralytics checkpoint.
    """
    if spec.lower().endswith((".yaml", ".yml")):
        local = Path(spec).expanduser()
        if "/" in spec and not local.is_file():
            raise InputError(f"--weights {spec}: model YAML not found")
        return InitialWeights(str(local) if local.is_file() else spec, None)
    ref = resolve_model(spec, tracking_uri=tracking_uri, cache_dir=scratch / "weights")
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(ref.weights))
        model = ckpt.get("ema") or ckpt["model"]
        names = model.names
    except Exception as exc:  # any unpickling problem means the file is not usable weights
        raise InputError(f"{spec}: not an Ultralytics weights file ({type(exc).__name__}: "
                         f"{exc})") from None
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    return InitialWeights(str(ref.weights), tuple(str(n) for n in names),
                          ref.version if ref.registered else None)


def check_class_change(request: TrainRequest, weights: InitialWeights,
                       dataset: DatasetSummary) -> None:
    """Refuse, or warn and adapt, when the weights know other classes than the dataset."""
    assert weights.names is not None
    old, new = list(weights.names), list(dataset.names)
    kept = [n for n in new if n in old]
    change = (f"weights {request.weights} were trained for {len(old)} class(es) "
              f"[{', '.join(old)}] but the dataset has {len(new)} [{', '.join(new)}]")
    if request.class_mismatch == "refuse":
        raise InputError(f"{change}; refusing (class_mismatch=refuse). Use class_mismatch=adapt "
                         "to fine-tune with a new detection head, or train from a model YAML")
    log.warning("%s; adapting: new detection head, %d class(es) carried over by name (%s), "
                "%d new", change, len(kept), ", ".join(kept) or "none", len(new) - len(kept))


