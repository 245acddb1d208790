"""Scratch and resumption: the deterministic working folder of one training request.

A retry of the same request (after a crash, a kill or a lost worker) finds the folder again
by the request's identity, and resumes from Ultralytics' ``last.pt`` when it is usable.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrain_lib.core.errors import StorageError, TrainingFailed
from retrain_lib.core.io import atomic_write_text
from retrain_lib.core.settings import ENV_SCRATCH, scratch_root
from retrain_lib.training.contract import TrainRequest

__all__ = ["Scratch", "TrainingRun", "resumable"]


class Scratch:
    """The deterministic working folder of one request, found again by a retry.

    It lies under the request's ``scratch``, else $AUTORETRAIN_SCRATCH, else
    ``<temp dir>/autoretrain-train``.
    """

    def __init__(self, request: TrainRequest) -> None:
        given = request.scratch or os.environ.get(ENV_SCRATCH)
        root = Path(given).expanduser() if given else scratch_root() / "autoretrain-train"
        self.dir = root / f"train-{request.identity()[:20]}"
        self.state_file = self.dir / "state.json"
        self.result_file = self.dir / "result.json"
        self.save_dir = self.dir / "ultralytics" / "train"
        self._lock: Any = None

    def lock(self) -> None:
        """Hold the folder for this process; TrainingFailed when another one holds it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.dir}: cannot create the scratch directory ({exc})") from None
        self._lock = open(self.dir / "lock", "w")  # noqa: SIM115 - held for the whole training
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingFailed(f"another process is running the same training right now "
                                 f"(lock {self.dir / 'lock'})") from None

    def unlock(self) -> None:
        """Release the folder."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def state(self) -> dict[str, Any]:
        """What earlier attempts recorded (status, MLflow run, metrics)."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
            return state
        except (OSError, json.JSONDecodeError):
            return {}

    def update(self, **values: Any) -> None:
        """Record ``values`` in the state, atomically."""
        atomic_write_text(self.state_file, json.dumps({**self.state(), **values}, indent=2,
                                                      sort_keys=True))

    def wipe(self) -> None:
        """Forget an earlier attempt (everything but the lock)."""
        for child in self.dir.iterdir() if self.dir.is_dir() else []:
            if child.name == "lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def clean_after_success(self) -> None:
        """Keep only what a replay needs (state and result); drop chips and checkpoints."""
        # Keep only what a replay needs (state and result); drop chips and checkpoints.
        for name in ("data", "ultralytics", "weights"):
            shutil.rmtree(self.dir / name, ignore_errors=True)


def resumable(last: Path) -> bool:
    """Whether Ultralytics can resume from this ``last.pt`` (it may be cut short by a kill)."""
    if not last.is_file():
        return False
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(last))
    except Exception:  # a checkpoint cut short by a kill
        return False
    return ckpt.get("epoch", -1) >= 0 and ckpt.get("optimizer") is not None


@dataclass
class TrainingRun:
    """Mutable bookkeeping of one invocation of the entrypoint."""

    request: TrainRequest
    scratch: Scratch
    tracking_uri: str
    started: float = field(default_factory=time.monotonic)
    resumed: bool = False


