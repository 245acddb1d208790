"""Training benchmark: the AutoRetrain entrypoint (local runner) against plain ``yolo train``.

Both arms train the same model YAML on the same chips with the same settings, each in its own
process, one after the other:

- ``yolo``: Ultralytics' own command line, ``yolo detect train ...``, with its MLflow
  integration switched off (so it does no tracking at all): the strict baseline.
- ``yolo_mlflow``: the same with Ultralytics' default, its MLflow callback on (mlflow is
  installed), logging into the same kind of SQLite store: like-for-like on tracking.
- ``entrypoint``: :class:`retrain_lib.training.runners.local.LocalRunner` running ``python -m
  retrain_lib.training``: dataset check and layout, one MLflow run with per-epoch metrics,
  weights/results upload and the result JSON. Torch threads are pinned to what Ultralytics
  picks by itself, so the difference is the entrypoint's overhead alone.
- ``entrypoint_default``: the same with the entrypoint's default of one torch thread per CPU
  (Ultralytics leaves one core idle).

Throughput is training images per second of process wall time (epochs x train images / s),
imports, dataset scan, final validation and uploads included. ``loop`` is the same over
Ultralytics' own training-loop time (results.csv), which excludes start-up and the end.
The MLflow database is created before timing, as it exists in a deployment.

    python benchmarks/training.py                 # quick look
    python benchmarks/training.py --write-docs    # update the "Training" section of
                                                  # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from docs_section import markers, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out" / "training"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
ARMS = ("yolo", "yolo_mlflow", "entrypoint", "entrypoint_default")
CLASSES = ("car", "truck")


def make_chips(root: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> Path:
    """A dataset version folder (docs/training.md): rectangles of two classes on noise."""
    import numpy as np
    from PIL import Image

    if (root / "data.yaml").exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        entries = []
        for i in range(count):
            image = rng.normal(100, 18, (size, size, 3)).clip(0, 255).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(2, 8))):
                cls = int(rng.integers(0, 2))
                w, h = (int(rng.integers(8, 20)), int(rng.integers(8, 20))) if cls == 0 else (
                    int(rng.integers(20, 40)), int(rng.integers(10, 18)))
                x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                image[y0:y0 + h, x0:x0 + w] = (210, 50, 40) if cls == 0 else (40, 60, 200)
                lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} "
                             f"{w / size:.6f} {h / size:.6f}")
            rel = f"images/scene{i % 4}/{split}_{i:04d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / rel, quality=92)
            label = root / rel.replace("images/", "labels/").replace(".jpg", ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + "\n")
            entries.append(rel)
        (root / f"{split}.txt").write_text("".join(f"{e}\n" for e in entries))
    (root / "data.yaml").write_text(
        f"train: train.txt\nval: val.txt\nnc: 2\nnames: [{', '.join(CLASSES)}]\n")
    return root


def absolute_data_yaml(dataset: Path, out: Path) -> Path:
    """The same dataset for ``yolo train``, which resolves list entries against the cwd."""
    for split in ("train", "val"):
        lines = (dataset / f"{split}.txt").read_text().split()
        (out / f"{split}_abs.txt").write_text("".join(f"{dataset / p}\n" for p in lines))
    data = out / "data_abs.yaml"
    data.write_text(f"train: {out / 'train_abs.txt'}\nval: {out / 'val_abs.txt'}\n"
                    f"nc: 2\nnames: [{', '.join(CLASSES)}]\n")
    return data


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _loop_seconds(results_csv: Path) -> float:
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["time"]) if rows else float("nan")


def run_arm(arm: str, args: argparse.Namespace, dataset: Path, out: Path,
            env: dict[str, str], attempt: int) -> dict[str, Any]:
    """Train once with one arm; returns timings."""
    run_dir = out / f"{arm}-{attempt}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    settings = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch}
    cpu0, start = _children_cpu(), time.perf_counter()
    if arm in ("yolo", "yolo_mlflow"):
        data = absolute_data_yaml(dataset, out)
        arm_env = dict(env)
        if arm == "yolo_mlflow":
            arm_env.update(YOLO_CONFIG_DIR=str(out / "ultralytics-config-mlflow"),
                           MLFLOW_TRACKING_URI=args.mlflow_uri,
                           MLFLOW_EXPERIMENT_NAME="benchmark-training-yolo")
        cmd = [str(Path(sys.executable).with_name("yolo")), "detect", "train", f"data={data}",
               "model=yolo11n.yaml", "device=cpu", "workers=0", "plots=False", "seed=0",
               f"project={run_dir}", "name=run", "exist_ok=True",
               *(f"{k}={v}" for k, v in settings.items())]
        subprocess.run(cmd, env=arm_env, cwd=run_dir, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        results = run_dir / "run" / "results.csv"
    else:
        from retrain_lib.training.contract import TrainRequest
        from retrain_lib.training.runners.local import LocalRunner

        arm_env = dict(env)
        if arm == "entrypoint":
            arm_env["AUTORETRAIN_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) - 1))
        request = TrainRequest(data=str(dataset), weights="yolo11n.yaml",
                               out=str(run_dir / "out"), mlflow_uri=args.mlflow_uri,
                               experiment="benchmark-training", scratch=str(run_dir / "scr"),
                               plots=False, seed=0, candidate=f"{arm}-{attempt}", **settings)
        quiet = logging.getLogger("benchmarks.training.quiet")
        quiet.propagate = False  # the streamed training output is only timed here
        LocalRunner(env=arm_env, cwd=run_dir, logger=quiet).run(request)
        results = run_dir / "out" / "results.csv"
    wall = time.perf_counter() - start
    images = args.epochs * args.train
    loop = _loop_seconds(results)
    return {"arm": arm, "wall_s": wall, "cpu_s": _children_cpu() - cpu0,
            "images_per_s": images / wall, "loop_images_per_s": images / loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=64, help="train chips")
    parser.add_argument("--val", type=int, default=16, help="val chips")
    parser.add_argument("--size", type=int, default=320, help="chip size in pixels")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm (median kept)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--section", default="main", help="docs section: 'main' (Training) "
                        "or a suffix, e.g. 'long' (Training: long)")
    args = parser.parse_args()
    args.argv = _shown_arguments(sys.argv[1:])

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = make_chips(out / "datasets" / f"bench-{args.train}-{args.size}", args.train,
                         args.val, args.size)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AUTORETRAIN_"))}
    env.update(YOLO_CONFIG_DIR=str(out / "ultralytics-config"), YOLO_OFFLINE="1",
               MPLBACKEND="Agg")
    # The baseline does no tracking: Ultralytics' MLflow callback off in its own settings.
    subprocess.run([str(Path(sys.executable).with_name("yolo")), "settings", "mlflow=False"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.mlflow_uri = f"sqlite:///{out / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(args.mlflow_uri).search_experiments()  # schema exists before timing

    runs: list[dict[str, Any]] = []
    for attempt in range(args.repeats):
        order = args.arms if attempt % 2 == 0 else list(reversed(args.arms))
        for arm in order:
            runs.append(run_arm(arm, args, dataset, out, env, attempt))
            print(f"{arm:>20} #{attempt}: {runs[-1]['wall_s']:.1f} s, "
                  f"{runs[-1]['images_per_s']:.2f} img/s", file=sys.stderr)
    rows = summarise(runs, args.arms)
    text = render(rows, args)
    print(text)
    if args.write_docs:
        write_docs(text, args.section)


def _shown_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments worth printing (no machine paths)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            shown.append(arg)
    return shown


def summarise(runs: list[dict[str, Any]], arms: list[str]) -> list[dict[str, Any]]:
    """Median wall and CPU time per arm; throughputs derived from the medians."""
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        wall = statistics.median(r["wall_s"] for r in mine)
        rows.append({"arm": arm, "wall_s": wall,
                     "cpu_s": statistics.median(r["cpu_s"] for r in mine),
                     "images_per_s": mine[0]["images_per_s"] * mine[0]["wall_s"] / wall,
                     "loop_images_per_s": statistics.median(r["loop_images_per_s"]
                                                            for r in mine)})
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = next(r for r in rows if r["arm"] == "yolo")
    import torch
    import ultralytics

    load = os.getloadavg()[0]
    begin, end = markers(section_name(args.section))
    title = "Training" if args.section == "main" else f"Training: {args.section}"
    lines = [
        begin,
        f"## {title}",
        "",
        f"Data: {args.train} train + {args.val} val synthetic chips of {args.size} px (JPEG), "
        f"2 classes. YOLO11n from `yolo11n.yaml`, {args.epochs} epochs, imgsz {args.imgsz}, "
        f"batch {args.batch}, CPU, median of {args.repeats} runs per arm, arms alternating.",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, ultralytics "
        f"{ultralytics.__version__}; load average {load:.1f} when the run ended.",
        "",
        "| arm | images/s | time (s) | time vs yolo | CPU (s) | CPU vs yolo | loop images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['images_per_s']:.2f} | {r['wall_s']:.1f} | "
            f"{(r['wall_s'] / base['wall_s'] - 1) * 100:+.1f} % | {r['cpu_s']:.1f} | "
            f"{(r['cpu_s'] / base['cpu_s'] - 1) * 100:+.1f} % | {r['loop_images_per_s']:.2f} |")
    entry = next(r for r in rows if r["arm"] == "entrypoint")
    overhead = (entry["wall_s"] / base["wall_s"] - 1) * 100
    like = next((r for r in rows if r["arm"] == "yolo_mlflow"), None)
    versus = (f" Against `yolo_mlflow`: {(entry['wall_s'] / like['wall_s'] - 1) * 100:+.1f} % "
              f"wall time, {entry['cpu_s'] - like['cpu_s']:+.1f} s CPU." if like else "")
    lines += [
        "",
        "- **images/s**: epochs x train images / process wall time (imports, dataset check, "
        "final validation, MLflow logging and uploads included). **loop images/s**: the same "
        "over Ultralytics' training-loop time from results.csv. **CPU**: user + system "
        "seconds of the process tree (less sensitive than wall time to other load).",
        "- `yolo`: `yolo detect train` with Ultralytics' MLflow integration off, so it tracks "
        "nothing; `yolo_mlflow`: the same with Ultralytics' default MLflow callback on "
        "(same SQLite store). `entrypoint`: `LocalRunner` -> `python -m retrain_lib.training` "
        "with torch threads pinned to Ultralytics' own choice (cores - 1); "
        "`entrypoint_default`: the entrypoint's default of one thread per core.",
        f"- Entrypoint overhead at equal threads: {overhead:+.1f} % wall time, "
        f"{entry['cpu_s'] - base['cpu_s']:+.1f} s CPU (target: at most +5 % "
        f"wall time).{versus}",
        "",
        f"Reproduce: `python benchmarks/training.py {' '.join(args.argv)}`",
        end,
    ]
    return "\n".join(lines)


def section_name(section: str) -> str:
    """Name of the docs/benchmarks.md section a run writes."""
    return "training" if section == "main" else f"training-{section}"


def write_docs(section: str, name: str) -> None:
    """Replace this section of docs/benchmarks.md, or append it."""
    write_section(section, section_name(name))


if __name__ == "__main__":
    main()
