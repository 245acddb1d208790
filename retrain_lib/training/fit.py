"""Fine-tune a YOLO detector on one dataset version, and publish what it produced.

:func:`train_model` is what the entrypoint (``python -m retrain_lib.training``, or
``autoretrain train``) runs. Everything the training writes goes under the request's ``out``,
its scratch folder and MLflow; nothing lands in the working directory. A retry of the same
request resumes (see :mod:`retrain_lib.training.scratch`); a retry after success returns the
stored result without training again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrain_lib.core.device import check_device_available
from retrain_lib.core.errors import ConfigError, RetrainError, TrainingFailed
from retrain_lib.core.io import atomic_write_text, file_sha256
from retrain_lib.core.storage import Storage, open_storage
from retrain_lib.stages.mlflow_server import mlflow_errors
from retrain_lib.stages.weights import WEIGHTS_IN_RUN, WEIGHTS_SHA256_TAG
from retrain_lib.training.contract import TrainRequest, TrainResult
from retrain_lib.training.initial_weights import (
    InitialWeights,
    check_class_change,
    resolve_initial_weights,
)
from retrain_lib.training.scratch import Scratch, TrainingRun, resumable
from retrain_lib.training.sources import DatasetSummary, prepare_dataset
from retrain_lib.training.tracking import FINAL_METRICS, Tracking, read_results_csv, tracking_uri

__all__ = ["train_model"]

log = logging.getLogger(__name__)

ENV_TORCH_THREADS = "AUTORETRAIN_TORCH_THREADS"
"""CPU threads for torch; default: every CPU this process may use."""

# Ultralytics integrations that log on their own when enabled; training keeps them all off.
_INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard",
                 "wandb", "sync")
_FOREIGN_CALLBACK_MODULES = tuple(f"ultralytics.utils.callbacks.{n}" for n in (
    "clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wb"))


def _torch_threads() -> int:
    value = os.environ.get(ENV_TORCH_THREADS)
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ConfigError(f"{ENV_TORCH_THREADS}={value!r}: expected a positive integer"
                              ) from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _ultralytics_integrations_off() -> Iterator[None]:
    """Switch Ultralytics' own loggers (MLflow, TensorBoard, ...) off, in memory only.

    Ultralytics enables its MLflow callback whenever mlflow is importable; it would open a
    second run (or write ./mlruns). Settings are changed without persisting them, so the
    user's Ultralytics settings file stays as it was.
    """
    from ultralytics.utils import SETTINGS

    saved = {k: SETTINGS[k] for k in _INTEGRATIONS if k in SETTINGS}
    for key in saved:
        dict.__setitem__(SETTINGS, key, False)
    try:
        yield
    finally:
        for key, value in saved.items():
            dict.__setitem__(SETTINGS, key, value)


def _drop_foreign_loggers(trainer: Any) -> None:
    """Second guard: remove integration callbacks that got registered anyway."""
    for event, funcs in trainer.callbacks.items():
        kept = [f for f in funcs if not getattr(f, "__module__", "").startswith(
            _FOREIGN_CALLBACK_MODULES)]
        if len(kept) != len(funcs):
            log.warning("removed %d Ultralytics integration callback(s) from %s",
                        len(funcs) - len(kept), event)
            funcs[:] = kept


def train_model(request: TrainRequest, *, fresh: bool = False) -> TrainResult:
    """Fine-tune a detector as ``request`` says; log one MLflow run; upload the results.

    Args:
        request: what to train.
        fresh: forget an earlier, interrupted attempt of the same request and start over.

    Raises:
        ConfigError: bad settings (no tracking URI, CUDA requested but absent, ...).
        InputError: unusable dataset or weights.
        StorageError: storage or the MLflow server cannot be reached.
        TrainingFailed: Ultralytics failed while training.
    """
    check_device_available(request.device)
    uri = tracking_uri(request)
    scratch = Scratch(request)
    scratch.lock()
    try:
        if fresh:
            scratch.wipe()
        run = TrainingRun(request, scratch, uri)
        done = _replay(run)
        return done if done is not None else _train(run)
    finally:
        scratch.unlock()


def _replay(run: TrainingRun) -> TrainResult | None:
    """The stored result of an earlier, finished attempt, if its weights are still there."""
    state = run.scratch.state()
    if state.get("status") != "done" or not run.scratch.result_file.is_file():
        return None
    stored = TrainResult.from_dict(json.loads(run.scratch.result_file.read_text()))
    if not open_storage(run.request.out).exists(WEIGHTS_IN_RUN):
        log.warning("earlier result found but %s is gone; training again", stored.weights_uri)
        run.scratch.wipe()
        return None
    log.info("this training already finished (MLflow run %s); returning its result",
             stored.mlflow_run_id)
    return stored.model_copy(update={"resumed": True,
                                     "wall_time_s": round(time.monotonic() - run.started, 3)})


def _check_out_writable(storage: Storage) -> None:
    # Hours of training must not end in 'cannot upload': probe the destination first.
    probe = ".autoretrain-write-probe"
    storage.put_bytes(probe, b"ok")
    storage.delete(probe)


def _train(run: TrainingRun) -> TrainResult:
    request, scratch = run.request, run.scratch
    out = open_storage(request.out)
    _check_out_writable(out)
    dataset = prepare_dataset(request.data, scratch.dir, request.classes,
                              request.dataset_version)
    log.info("dataset %s: %d train / %d val images, classes %s", dataset.location,
             dataset.train_images, dataset.val_images, ", ".join(dataset.names))
    weights = resolve_initial_weights(request.weights, scratch.dir, run.tracking_uri)
    adapted = weights.names is not None and weights.names != dataset.names
    if adapted:
        check_class_change(request, weights, dataset)

    trained = scratch.state().get("status") == "trained"
    resume = not trained and resumable(scratch.save_dir / "weights" / "last.pt")
    run.resumed = resume or trained
    tracking = Tracking(run, dataset, weights, adapted)
    try:
        if not trained:
            metrics = _fit(run, dataset, weights, resume, tracking)
            tracking.wait()  # its state update must land before ours
            scratch.update(status="trained", metrics=metrics)
        else:
            tracking.start()
            tracking.wait()
        metrics = scratch.state()["metrics"]
        log.info("training done; uploading results to %s", out.uri)
        assert tracking.epoch_logger is not None
        tracking.epoch_logger.log_rows(scratch.save_dir / "results.csv")
        with mlflow_errors("publishing the training's results", run.tracking_uri):
            result = _publish(run, tracking.client, tracking.run_id, out, metrics, dataset)
    except BaseException as exc:
        tracking.finish("KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit)
                        else "FAILED")
        raise
    tracking.finish("FINISHED")
    atomic_write_text(scratch.result_file, result.to_line())
    scratch.update(status="done")
    scratch.clean_after_success()
    return result


def _fit(run: TrainingRun, dataset: DatasetSummary, weights: InitialWeights, resume: bool,
         tracking: Tracking) -> dict[str, float]:
    """Run Ultralytics; returns the final validation metrics of best.pt."""
    request = run.request
    # polars: Ultralytics imports it at the first epoch end anyway; importing it here keeps
    # the tracking thread and this one from importing it at the same moment.
    import polars  # noqa: F401
    import torch
    from ultralytics import YOLO

    tracking.start()
    threads = torch.get_num_threads()
    if request.device == "cpu":
        # Ultralytics leaves one core idle on import; training uses them all.
        torch.set_num_threads(_torch_threads())
    args: dict[str, Any] = {
        "data": str(dataset.data_yaml), "device": request.device, "workers": request.workers,
        "plots": request.plots, "imgsz": request.imgsz, "batch": request.batch,
    }
    if resume:
        last = run.scratch.save_dir / "weights" / "last.pt"
        log.info("resuming from %s", last)
        model = YOLO(str(last))
        args["resume"] = True
    else:
        model = YOLO(weights.path)
        args.update(
            epochs=request.epochs, seed=request.seed, project=str(run.scratch.save_dir.parent),
            name=run.scratch.save_dir.name, exist_ok=True, verbose=True, **request.params)
    model.add_callback("on_pretrain_routine_start", _drop_foreign_loggers)
    model.add_callback("on_fit_epoch_end", tracking.log_epoch)
    try:
        with _ultralytics_integrations_off():
            model.train(**args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except RetrainError:
        raise
    except Exception as exc:
        raise TrainingFailed(f"Ultralytics training failed: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(threads)  # this process may run other work afterwards
    trainer = model.trainer
    raw = dict(getattr(trainer, "metrics", None) or {})
    return {name: round(float(raw[key]), 6) for key, name in FINAL_METRICS.items() if key in raw}


def _publish(run: TrainingRun, client: Any, run_id: str, out: Storage, metrics: dict[str, float],
             dataset: DatasetSummary) -> TrainResult:
    """Upload weights, results and plots to ``out`` and MLflow; build the result."""
    save_dir = run.scratch.save_dir
    best = save_dir / "weights" / "best.pt"
    if not best.is_file():
        best = save_dir / "weights" / "last.pt"
    if not best.is_file():
        raise TrainingFailed(f"training ended without weights in {save_dir / 'weights'}")
    request_file = run.scratch.dir / "request.json"
    request_file.write_text(run.request.model_dump_json(indent=2))
    uploads: list[tuple[Path, str]] = [(best, WEIGHTS_IN_RUN), (request_file, "request.json")]
    for name in ("results.csv", "args.yaml"):
        if (save_dir / name).is_file():
            uploads.append((save_dir / name, name))
    for plot in sorted([*save_dir.glob("*.png"), *save_dir.glob("*.jpg")]):
        uploads.append((plot, f"plots/{plot.name}"))
    for path, key in uploads:
        out.put_file(path, key)
        client.log_artifact(run_id, str(path), artifact_path=posixpath.dirname(key) or None)
    from mlflow.entities import Metric, RunTag

    # The digest lets registration and `autoretrain trace` check the weights they are given.
    weights_sha256 = file_sha256(best)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"final/{k}", v, now, 0) for k, v in
                                      metrics.items()],
                     tags=[RunTag(WEIGHTS_SHA256_TAG, weights_sha256)])
    rows = read_results_csv(save_dir / "results.csv")
    result = TrainResult(
        mlflow_run_id=run_id, weights_uri=out.url(WEIGHTS_IN_RUN), metrics=metrics,
        epochs_run=int(max((r.get("epoch", 0) for r in rows), default=0)),
        wall_time_s=round(time.monotonic() - run.started, 3), resumed=run.resumed,
        out_uri=out.uri, model_source=client.get_run(run_id).info.artifact_uri,
        classes=dataset.names, weights_sha256=weights_sha256)
    out.put_bytes("result.json", (result.to_line() + "\n").encode("utf-8"))
    return result


