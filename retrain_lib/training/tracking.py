"""The MLflow side of a training: its run, parameters, tags and per-epoch metrics.

One MLflow run per training request; a retry continues it, and each epoch's row of
Ultralytics' ``results.csv`` is logged exactly once, also across resumption.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from retrain_lib import __version__
from retrain_lib.core.errors import ConfigError
from retrain_lib.core.settings import ENV_TRACKING_URI
from retrain_lib.stages.mlflow_server import check_reachable, mlflow_client, mlflow_errors
from retrain_lib.training.contract import CONTAINER_IMAGE_ENV, TrainRequest
from retrain_lib.training.initial_weights import InitialWeights
from retrain_lib.training.scratch import TrainingRun
from retrain_lib.training.sources import DatasetSummary

__all__ = [
    "FINAL_METRICS",
    "EpochLogger",
    "Tracking",
    "code_version",
    "read_results_csv",
    "tracking_uri",
]

log = logging.getLogger(__name__)

ENV_GIT_SHA = "AUTORETRAIN_GIT_SHA"
"""Set in the trainer image at build time, where no .git directory exists."""
FINAL_METRICS = {  # Ultralytics' validation keys -> the names evaluation and promotion use
    "metrics/mAP50-95(B)": "map50_95",
    "metrics/mAP50(B)": "map50",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}


class Tracking:
    """The MLflow side of one training, set up in a background thread.

    Importing mlflow and opening its store cost seconds of CPU; started once Ultralytics is
    imported, that work overlaps with the trainer's start-up and first epoch, whose tensor
    work runs outside the GIL. The first epoch-end callback waits for it, so metrics are
    never lost, and a tracking failure stops the training there.
    """

    def __init__(self, run: TrainingRun, dataset: DatasetSummary, weights: InitialWeights,
                 adapted: bool) -> None:
        self.run = run
        self.dataset = dataset
        self.weights = weights
        self.adapted = adapted
        self.client: Any = None
        self.run_id = ""
        self.epoch_logger: EpochLogger | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._setup, name="autoretrain-mlflow",
                                        daemon=True)

    def start(self) -> None:
        """Begin connecting (once)."""
        if not self._thread.is_alive() and not self._thread.ident:
            self._thread.start()

    def wait(self) -> None:
        """Block until the run is ready; re-raise what went wrong while setting it up."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def log_epoch(self, trainer: Any) -> None:
        """Ultralytics' on_fit_epoch_end callback."""
        self.wait()
        assert self.epoch_logger is not None
        self.epoch_logger(trainer)

    def finish(self, status: str) -> None:
        """End the run with ``status``; on the failure paths never raise."""
        if not self._thread.ident:
            return
        self._thread.join()
        if not self.run_id:
            return
        if status == "FINISHED":
            self.client.set_terminated(self.run_id, status=status)
            return
        with contextlib.suppress(Exception):
            self.client.set_terminated(self.run_id, status=status)

    def _setup(self) -> None:
        try:
            with mlflow_errors("setting up the training's run", self.run.tracking_uri):
                self._connect()
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc

    def _connect(self) -> None:
        from mlflow.entities import Param, RunTag

        run, request, dataset = self.run, self.run.request, self.dataset
        client, _ = mlflow_client(run.tracking_uri)
        experiment_id = _experiment_id(client, request.experiment, run.tracking_uri)
        state = run.scratch.state()
        run_id = _mlflow_run(client, experiment_id, state, request.default_run_name(),
                             continuing=run.resumed)
        run.scratch.update(mlflow_run_id=run_id, status=state.get("status", "training"),
                           request=request.model_dump())
        version, sha = code_version()
        tags = {
            "object_type": request.object_type or "",
            "dataset_version": dataset.version,
            "parent_model_version": request.parent_model_version
            or self.weights.parent_version or "",
            "cycle_id": request.cycle_id or "",
            "candidate": request.candidate or "",
            "code_version": version,
            "class_names": ",".join(dataset.names),
            "head_adapted": str(self.adapted).lower(),
            "autoretrain.request_hash": request.identity()[:20],
            # Set by the Docker and Kubernetes runners: the image (with its id) it ran in.
            "container_image": os.environ.get(CONTAINER_IMAGE_ENV, ""),
        }
        if sha:
            tags["mlflow.source.git.commit"] = sha
        params = {
            "data": request.data, "weights": request.weights, "epochs": request.epochs,
            "imgsz": request.imgsz, "batch": request.batch, "device": request.device,
            "workers": request.workers, "seed": request.seed, "nc": len(dataset.names),
            "train_images": dataset.train_images, "val_images": dataset.val_images,
            "train_instances": ",".join(map(str, dataset.train_instances)),
            **{k: json.dumps(v) if isinstance(v, list) else v
               for k, v in request.params.items()},
        }
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items() if v != ""])
        self.epoch_logger = EpochLogger(client, run_id)
        self.client, self.run_id = client, run_id
        log.info("MLflow run %s in experiment %r at %s", run_id, request.experiment,
                 run.tracking_uri)


def _mlflow_run(client: Any, experiment_id: str, state: dict[str, Any], run_name: str, *,
                continuing: bool) -> str:
    """The run of this training: the earlier attempt's when it can be continued, else new."""
    from mlflow.exceptions import MlflowException

    run_id = state.get("mlflow_run_id")
    if run_id:
        try:
            existing = client.get_run(run_id)
        except MlflowException:
            existing = None
        if existing is not None and existing.info.lifecycle_stage == "active":
            logged = client.get_metric_history(run_id, "epoch")
            if continuing or not logged:
                if existing.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                return str(run_id)
            # Training restarts from scratch (no usable last.pt): a clean run, and the old one
            # says why it ended.
            client.set_tag(run_id, "autoretrain.superseded", "restarted without a checkpoint")
            client.set_terminated(run_id, status="FAILED")
    created = client.create_run(experiment_id, run_name=run_name)
    return str(created.info.run_id)


def tracking_uri(request: TrainRequest) -> str:
    """The request's MLflow tracking URI (or $MLFLOW_TRACKING_URI), checked to answer.

    Raises:
        ConfigError: there is none.
        RegistryUnavailable: the server does not answer.
    """
    uri = request.mlflow_uri or os.environ.get(ENV_TRACKING_URI)
    if not uri:
        raise ConfigError("no MLflow tracking URI: pass --mlflow-uri (e.g. http://mlflow:5000 "
                          "or sqlite:////abs/path/mlflow.db) or set MLFLOW_TRACKING_URI")
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    return uri


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it or choose "
                              "another --experiment")
        return str(found.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # MLflow's default artifact root for a database store is ./mlartifacts in the working
        # directory; keep artifacts beside the database instead.
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created concurrently by a sibling candidate
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _metric_name(column: str) -> str:
    name = column.strip()
    final = FINAL_METRICS.get(name)
    if final:
        return f"val/{final}"
    return {"time": "train/elapsed_s"}.get(name, name.replace("(B)", ""))


def read_results_csv(path: Path) -> list[dict[str, float]]:
    """The rows of Ultralytics' results.csv as numbers (a row cut short by a kill is left out)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k.strip(): float(v) for k, v in row.items() if k and v not in
                             (None, "")})
            except ValueError:
                continue  # a row cut short by a kill
    return rows


class EpochLogger:
    """Logs each epoch's results.csv row to MLflow exactly once, also across resumption."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        history = client.get_metric_history(run_id, "epoch")
        self.logged = int(max((m.step for m in history), default=0))

    def __call__(self, trainer: Any) -> None:
        self.log_rows(Path(trainer.csv))

    def log_rows(self, csv_path: Path) -> None:
        """Log the rows of ``csv_path`` not logged yet."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for row in read_results_csv(csv_path):
            epoch = int(row.get("epoch", 0))
            if epoch <= self.logged:
                continue
            metrics = [Metric("epoch", float(epoch), now, epoch)]
            metrics += [Metric(_metric_name(k), v, now, epoch) for k, v in row.items()
                        if k != "epoch"]
            # One batch per epoch: it is stored or not, so a kill never leaves half an epoch.
            self.client.log_batch(self.run_id, metrics=metrics)
            self.logged = epoch


def code_version() -> tuple[str, str | None]:
    """The package version with the checkout's commit (``0.1.0+g<sha>``), and the commit."""
    sha = os.environ.get(ENV_GIT_SHA) or _git_sha(Path(__file__).resolve().parents[2] / ".git")
    return (f"{__version__}+g{sha[:12]}" if sha else __version__), sha


def _git_sha(git_dir: Path) -> str | None:
    # Read the checkout's HEAD directly: no git binary needed, nothing executed.
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[len("ref: "):]
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip() or None
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        return None
    return None


