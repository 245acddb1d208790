"""The training entrypoint's command line: ``python -m retrain_lib.training`` and
``autoretrain train`` are the same command.

Runs the same way as a local process, in the trainer container, or in a Kubernetes pod::

    python -m retrain_lib.training --data s3://bucket/datasets/vehicle/<version> \\
        --weights champion.pt --epochs 30 --imgsz 640 --batch 16 --device 0 \\
        --out s3://bucket/models/vehicle/<run> --mlflow-uri http://mlflow:5000

The last line printed on stdout is the result JSON
(:class:`~retrain_lib.training.contract.TrainResult`); an error is one ``error:`` line on
stderr and exit code 2 (bad input or settings) or 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from retrain_lib.core.config import TrainArgument
from retrain_lib.core.console import handle_errors
from retrain_lib.core.errors import ConfigError
from retrain_lib.core.io import atomic_write_text
from retrain_lib.training.contract import TrainRequest, TrainResult
from retrain_lib.training.fit import train_model

__all__ = ["main", "parse_param", "run_cli", "train_command"]


def parse_param(text: str) -> tuple[str, TrainArgument]:
    """``key=value`` with a YAML-typed value (0.01 -> float, true -> bool, [0,1] -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--param {text!r}: expected key=value, e.g. lr0=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def run_cli(options: Mapping[str, Any], *, fresh: bool = False,
            result_file: str | Path | None = None) -> TrainResult:
    """Build the request from command-line options, train, print the result JSON last."""
    _configure_logging()
    values = {k: v for k, v in options.items() if v is not None}
    request = TrainRequest.parse(values, "train options")
    previous = _install_sigterm()
    try:
        result = train_model(request, fresh=fresh)
    finally:
        _restore_sigterm(previous)
    if result_file is not None:
        atomic_write_text(result_file, result.to_line() + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    sys.stdout.write(result.to_line() + "\n")
    sys.stdout.flush()
    return result


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _install_sigterm() -> Any:
    # Airflow and Docker stop a task with SIGTERM; turn it into an exception so the MLflow run
    # is marked KILLED and the scratch lock released (a retry then resumes).
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@handle_errors
def train_command(
    data: Annotated[str, typer.Option(help="Dataset version: folder or data.yaml (path, "
                                      "file:// or s3:// URI).")],
    out: Annotated[str, typer.Option(help="Output directory or storage URI prefix.")],
    weights: Annotated[str | None, typer.Option(help="Initial weights: .pt (path or URI), "
                                                "models:/name@alias, or a model YAML. Default: "
                                                "the config's initial_model.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Image size in pixels.")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, or CUDA indexes like 0 or 0,1.")
                      ] = None,
    workers: Annotated[int | None, typer.Option(help="Dataloader workers.")] = None,
    seed: Annotated[int | None, typer.Option(help="Training seed.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Extra Ultralytics train argument key=value (repeatable).")] = None,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="Draw and upload "
                                               "Ultralytics' plots.")] = None,
    config: Annotated[Path | None, typer.Option(help="Object-type YAML: gives the classes, the "
                                                "object type and training defaults.")] = None,
    classes: Annotated[str | None, typer.Option(help="Expected class names, comma-separated "
                                                "(default: the config's, else the dataset's).")
                       ] = None,
    class_mismatch: Annotated[str | None, typer.Option(
        help="Weights trained for other classes: adapt (new head) or refuse.")] = None,
    mlflow_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default "
                                                   "$MLFLOW_TRACKING_URI).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment.")] = None,
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
    object_type: Annotated[str | None, typer.Option(help="Tag: object type.")] = None,
    dataset_version: Annotated[str | None, typer.Option(help="Tag: dataset version.")] = None,
    parent_model_version: Annotated[str | None, typer.Option(
        help="Tag: registered model version of the initial weights.")] = None,
    cycle_id: Annotated[str | None, typer.Option(help="Tag: retraining cycle id.")] = None,
    candidate: Annotated[str | None, typer.Option(help="Tag: candidate name.")] = None,
    scratch: Annotated[str | None, typer.Option(help="Scratch root (default "
                                                "$AUTORETRAIN_SCRATCH or the temp dir).")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard an interrupted attempt instead of "
                                        "resuming it.")] = False,
    result_file: Annotated[Path | None, typer.Option(
        help="Also write the result JSON here (e.g. /airflow/xcom/return.json in a pod).")
                           ] = None,
) -> None:
    """Fine-tune a YOLO detector; the last line printed is the result JSON."""
    options: dict[str, object] = {
        "data": data, "out": out, "weights": weights, "epochs": epochs, "imgsz": imgsz,
        "batch": batch, "device": device, "workers": workers, "seed": seed, "plots": plots,
        "class_mismatch": class_mismatch, "mlflow_uri": mlflow_uri, "experiment": experiment,
        "run_name": run_name, "object_type": object_type, "dataset_version": dataset_version,
        "parent_model_version": parent_model_version, "cycle_id": cycle_id,
        "candidate": candidate, "scratch": scratch,
        "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        "params": dict(parse_param(p) for p in param or []),
    }
    if config is not None:
        from retrain_lib.core.config import load_object_type_config

        cfg = load_object_type_config(config)
        defaults = {"classes": cfg.classes, "object_type": cfg.name,
                    "weights": cfg.training.initial_model, "epochs": cfg.training.epochs,
                    "imgsz": cfg.training.imgsz, "batch": cfg.training.batch,
                    "device": cfg.training.device, "workers": cfg.training.workers,
                    "seed": cfg.training.seed}
        params = options["params"]
        options.update({k: v for k, v in defaults.items()
                        if options.get(k) is None and k not in params})  # type: ignore[operator]
    run_cli(options, fresh=fresh, result_file=result_file)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m retrain_lib.training``: the same options as ``autoretrain train``."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(train_command)
    single(args=list(sys.argv[1:] if argv is None else argv),
           prog_name="python -m retrain_lib.training")
