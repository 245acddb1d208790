"""Inference benchmark: ``detect`` against SAHI's sliced prediction and the forward-pass floor.

The same model (YOLO11n trained here on synthetic chips, cached under ``--out``) and the same
synthetic scene go through every arm, each in its own subprocess; the parent samples the
resident memory of the arm's process tree and scores its detections against the scene's
ground truth (COCO mAP, :func:`retrain_lib.stages.evaluate.evaluate_scenes`):

- ``detect``: :func:`retrain_lib.stages.inference.detect_scene` (windowed reads, prefetching reader,
  batched forward passes, cut-off filter + NMS merge).
- ``sahi``: ``sahi.predict.get_sliced_prediction`` with the same slice size and overlap,
  slices only (``perform_standard_pred=False``), batch 1, its default GREEDYNMM/IoS merge,
  as it comes: torch keeps the thread count Ultralytics sets on import (cores - 1).
- ``sahi_tuned``: the same with SAHI's ``batch_size`` equal to ours and torch on all cores.
- ``sahi_default``: SAHI's defaults (adds a full-image pass), as it comes.
- ``floor``: the fused model's forward passes alone (uint8 -> float upload included, NMS
  excluded) over the same tiles, read into memory beforehand; the batch size and thread
  count are the best of a short sweep. No sliced detector can do less work.

Each arm runs ``--repeats`` times, interleaved, and the fastest run counts (the machine may
be shared). Run ``python benchmarks/inference.py`` for the default comparison (a 2560 px
scene and one 4x its area); ``--write-docs`` replaces the "Inference" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from docs_section import write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out" / "inference"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- inference:begin -->"
SECTION_END = "<!-- inference:end -->"
ARMS = ("floor", "detect", "sahi", "sahi_tuned", "sahi_default")
TILE_PX = 640
OVERLAP = 0.2
CONF = 0.25
CLASSES = ("car", "truck")
# Training recipe of the benchmark model (part of its cache key).
TRAIN = {"scenes": 6, "size": 1024, "per_class": 45, "decoys": 15, "chip": 160, "epochs": 25,
         "imgsz": 160, "batch": 16, "seed": 0}


# ----------------------------------------------------------------------------- model and scene


def _quiet_ultralytics(config_dir: Path) -> None:
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"


def train_model(out: Path) -> Path:
    """YOLO11n trained on synthetic chips; cached by its recipe (a few CPU minutes)."""
    key = hashlib.sha256(json.dumps(TRAIN, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = out / f"model-{key}"
    weights = run_dir / "weights" / "best.pt"
    if weights.is_file():
        return weights
    from retrain_lib.core.config import TilingConfig
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop
    from retrain_lib.stages.tiling import tile_scene

    started = time.perf_counter()
    specs = [SceneSpec(f"train{i}", width=TRAIN["size"], height=TRAIN["size"],
                       region="vegetated" if i % 2 == 0 else "arid", classes=CLASSES,
                       objects_per_class=TRAIN["per_class"], decoys=TRAIN["decoys"],
                       seed=100 + i) for i in range(TRAIN["scenes"])]
    drop = out / f"train-{key}"
    scenes = make_drop(drop / "scenes", specs)
    params = TilingConfig(tile_size=TRAIN["chip"], overlap=0.2, background_ratio=0.2)
    shards = [tile_scene(s.path, s.annotations_path, list(CLASSES), drop / "chips", params)
              for s in scenes]
    # Scene-wise split: the last scene validates.
    lists = {"train": [], "val": []}
    for i, shard in enumerate(shards):
        images = sorted(str(p) for p in (shard.shard_dir / "images").iterdir())
        lists["val" if i == len(shards) - 1 else "train"].extend(images)
    for split, images in lists.items():
        (drop / f"{split}.txt").write_text("\n".join(images) + "\n")
    (drop / "data.yaml").write_text(
        f"path: {drop}\ntrain: train.txt\nval: val.txt\nnames:\n  0: car\n  1: truck\n")
    from ultralytics import YOLO, settings

    settings.update({"mlflow": False})
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    YOLO("yolo11n.yaml").train(
        data=str(drop / "data.yaml"), epochs=TRAIN["epochs"], imgsz=TRAIN["imgsz"],
        batch=TRAIN["batch"], workers=2, device="cpu", plots=False, amp=False,
        seed=TRAIN["seed"], project=str(out), name=run_dir.name, exist_ok=True,
        verbose=False, cache="ram")
    print(f"trained {weights} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return weights


def make_scene(out: Path, size: int) -> tuple[Path, Path]:
    """A test scene (cached) with the training scenes' object density, and decoys."""
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    scene_id = f"infer{size}"
    tif, geojson = out / "scenes" / f"{scene_id}.tif", out / "scenes" / f"{scene_id}.geojson"
    if tif.exists() and geojson.exists():
        return tif, geojson
    area = (size / TRAIN["size"]) ** 2
    spec = SceneSpec(scene_id, width=size, height=size, classes=CLASSES,
                     objects_per_class=round(TRAIN["per_class"] * area),
                     decoys=round(TRAIN["decoys"] * area), region="vegetated", seed=size)
    make_drop(out / "scenes", [spec])
    return tif, geojson


# ----------------------------------------------------------------------------- arms (children)


def _tiles_in_memory(scene: Path) -> list[np.ndarray]:
    import rasterio

    from retrain_lib.geo.raster import read_chip, scene_stretch
    from retrain_lib.geo.windows import tile_grid

    with rasterio.open(scene) as dataset:
        stretch = scene_stretch(dataset)
        windows = tile_grid(dataset.width, dataset.height, TILE_PX, round(OVERLAP * TILE_PX))
        return [read_chip(dataset, w, stretch).rgb for w in windows]


class _Floor:
    """Forward passes alone over tiles held in memory (upload included, NMS excluded)."""

    def __init__(self, detector: Any, scene: Path) -> None:
        self.detector = detector
        self.tiles = np.stack(_tiles_in_memory(scene))

    def forward(self, chunk: np.ndarray) -> None:
        import torch

        detector = self.detector
        with torch.inference_mode():
            x = torch.from_numpy(chunk).to(detector.device).permute(0, 3, 1, 2)
            detector.backend((x.half() if detector.half else x.float()).div_(255))
            if detector.device.type == "cuda":
                torch.cuda.synchronize()

    def timed(self, threads: int, batch: int, limit: int | None = None) -> float:
        import torch

        torch.set_num_threads(threads)
        data = self.tiles[:limit]
        self.forward(data[:batch])  # warm-up: kernels for this shape
        started = time.perf_counter()
        for i in range(0, len(data), batch):
            self.forward(data[i:i + batch])
        return time.perf_counter() - started


def _paired(floor: _Floor, config: tuple[int, int], arm_threads: int,
            arm: Any, rounds: int = 3) -> float:
    """Median of (arm time / floor time) over back-to-back rounds in this process, so that
    other load on the machine hits both sides alike."""
    import torch

    ratios = []
    for _ in range(rounds):
        floor_s = floor.timed(*config)
        torch.set_num_threads(arm_threads)
        started = time.perf_counter()
        arm()
        ratios.append((time.perf_counter() - started) / floor_s)
    return float(np.median(ratios))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_floor(weights: Path, scene: Path, batch: int | None, device: str) -> dict[str, Any]:
    from retrain_lib.stages.inference import load_detector

    detector = load_detector(weights, device=device)
    baseline = _rss_mib()
    floor = _Floor(detector, scene)
    sweep = {}
    batches = [batch] if batch else [1, 4, 8] if device == "cpu" else [8, 16, 32]
    for threads in sorted({1, os.cpu_count() or 1}):
        for size in batches:
            sweep[f"{threads}t/b{size}"] = floor.timed(threads, size, limit=8)
    best = min(sweep, key=sweep.get)  # type: ignore[arg-type]
    threads, size = (int(v) for v in best.split("t/b"))
    elapsed = floor.timed(threads, size)
    return {"elapsed_s": elapsed, "cold_s": None, "tiles": len(floor.tiles), "config": best,
            "sweep": {k: round(v, 3) for k, v in sweep.items()}, "baseline_rss_mib": baseline,
            "peak_mib": _peak_mib(), "paired_ratio": 1.0}


def run_detect(weights: Path, scene: Path, config: tuple[int, int], device: str
               ) -> dict[str, Any]:
    import torch

    from retrain_lib.core.config import TilingConfig
    from retrain_lib.stages.inference import DetectOptions, detect_scene, load_detector

    threads, batch = config
    detector = load_detector(weights, device=device, threads=threads)
    options = DetectOptions(tiling=TilingConfig(tile_size=TILE_PX, overlap=OVERLAP), conf=CONF,
                            batch=batch)
    baseline = _rss_mib()
    times = []
    for _ in range(2):  # cold (first scene after loading), then warm
        started = time.perf_counter()
        result = detect_scene(scene, detector, options)
        times.append(time.perf_counter() - started)
    peak = _peak_mib()  # before the paired floor puts every tile in memory
    ratio = _paired(_Floor(detector, scene), config, torch.get_num_threads(),
                    lambda: detect_scene(scene, detector, options))
    stats = result.stats
    return {"cold_s": times[0], "elapsed_s": times[1], "tiles": stats.tiles_total,
            "baseline_rss_mib": baseline, "peak_mib": peak, "paired_ratio": ratio,
            "config": f"{threads}t/b{batch}", "model_s": stats.seconds_model,
            "waiting_s": stats.seconds_waiting_for_tiles, "merge_s": stats.seconds_merge,
            "boxes": result.boxes.tolist(), "scores": result.scores.tolist(),
            "classes": result.classes.tolist()}


def run_sahi(weights: Path, scene: Path, config: tuple[int, int], standard_pred: bool,
             tuned: bool, device: str) -> dict[str, Any]:
    import torch
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    from retrain_lib.stages.inference import load_detector

    model = AutoDetectionModel.from_pretrained(
        model_type="ultralytics", model_path=str(weights), confidence_threshold=CONF,
        device="cpu" if device == "cpu" else f"cuda:{device}", image_size=TILE_PX)
    if tuned:  # Ultralytics' import left torch at cores - 1 threads
        torch.set_num_threads(config[0])
    threads, batch = torch.get_num_threads(), config[1] if tuned else 1

    def predict() -> Any:
        return get_sliced_prediction(
            str(scene), model, slice_height=TILE_PX, slice_width=TILE_PX,
            overlap_height_ratio=OVERLAP, overlap_width_ratio=OVERLAP,
            perform_standard_pred=standard_pred, batch_size=batch, verbose=0)

    baseline = _rss_mib()
    times = []
    for _ in range(2):  # cold (SAHI sets up Ultralytics' predictor lazily), then warm
        started = time.perf_counter()
        result = predict()
        times.append(time.perf_counter() - started)
    peak = _peak_mib()
    floor = _Floor(load_detector(weights, device=device, threads=threads), scene)
    ratio = _paired(floor, config, threads, predict)
    preds = result.object_prediction_list
    return {"cold_s": times[0], "elapsed_s": times[1], "baseline_rss_mib": baseline,
            "peak_mib": peak, "paired_ratio": ratio, "config": f"{threads}t/b{batch}",
            "boxes": [[float(v) for v in (p.bbox.minx, p.bbox.miny, p.bbox.maxx, p.bbox.maxy)]
                      for p in preds],
            "scores": [float(p.score.value) for p in preds],
            "classes": [int(p.category.id) for p in preds]}


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def child_main(args: argparse.Namespace) -> None:
    _quiet_ultralytics(Path(args.out) / "yolo-config")
    weights, scene = Path(args.weights), Path(args.scene)
    config = (args.threads or os.cpu_count() or 1, args.batch)
    if args.arm == "floor":
        info = run_floor(weights, scene, args.floor_batch, args.device)
    elif args.arm == "detect":
        info = run_detect(weights, scene, config, args.device)
    else:
        info = run_sahi(weights, scene, config, standard_pred=args.arm == "sahi_default",
                        tuned=args.arm == "sahi_tuned", device=args.device)
    info["child_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(info))


# ----------------------------------------------------------------------------- parent


def run_arm(arm: str, args: argparse.Namespace, weights: Path, scene: Path,
            tuned: tuple[int, int] | None) -> dict[str, Any]:
    """Run one arm in a fresh process; ``tuned`` is the floor's (threads, batch)."""
    result_path = Path(args.out) / f"result-{arm}.json"
    result_path.unlink(missing_ok=True)
    threads, batch = tuned if tuned and args.batch is None else (None, args.batch or 8)
    cmd = [sys.executable, __file__, "--child", "--arm", arm, "--weights", str(weights),
           "--scene", str(scene), "--out", args.out, "--batch", str(batch),
           "--result", str(result_path), "--device", args.device]
    if threads:
        cmd += ["--threads", str(threads)]
    if args.floor_batch:
        cmd += ["--floor-batch", str(args.floor_batch)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=REPO_ROOT, check=False)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"arm": arm, "failed": f"exit {proc.returncode}: {tail}"}
    info = json.loads(result_path.read_text())
    info["arm"] = arm
    return info


def score(info: dict[str, Any], truth_path: Path, scene: Path) -> dict[str, Any]:
    import rasterio

    from retrain_lib.geo.annotations import read_scene_boxes
    from retrain_lib.geo.crs import to_crs
    from retrain_lib.stages.evaluate import SceneEvalInput, evaluate_scenes

    with rasterio.open(scene) as dataset:
        transform, crs = dataset.transform, to_crs(dataset.crs)
    truth = read_scene_boxes(truth_path, crs=crs, transform=transform)
    lookup = {name: k for k, name in enumerate(CLASSES)}
    scene_input = SceneEvalInput(
        scene.stem, np.array(info["boxes"], float).reshape(-1, 4), np.array(info["classes"]),
        np.array(info["scores"], float), truth.boxes,
        np.array([lookup[c] for c in truth.class_names]))
    metrics = evaluate_scenes([scene_input], list(CLASSES), conf_threshold=CONF)
    return {"map50_95": metrics.map50_95, "map50": metrics.map50,
            "precision": metrics.precision, "recall": metrics.recall,
            "detections": metrics.counts.pred_total}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import ultralytics

    ram = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM, Python "
            f"{platform.python_version()}, torch {torch.__version__}, ultralytics "
            f"{ultralytics.__version__}")


def render(by_size: dict[int, list[dict[str, Any]]], args: argparse.Namespace,
           model_note: str, command: str, load: str) -> str:
    parts = []
    for size, results in by_size.items():
        ok = {r["arm"]: r for r in results if "failed" not in r}
        sahi = ok.get("sahi")
        rows = []
        for r in results:
            if "failed" in r:
                rows.append(f"| {r['arm']} | failed: {r['failed'].splitlines()[0]} "
                            "| | | | | | | | | |")
                continue
            rate = r["tiles_n"] / r["elapsed_s"]
            cold = f"{r['cold_s']:.1f}" if r.get("cold_s") else "-"
            warm_vs = (f"{sahi['paired_ratio'] / r['paired_ratio']:.2f}x" if sahi else "-")
            cold_vs = (f"{sahi['cold_s'] / r['cold_s']:.2f}x" if sahi and r.get("cold_s")
                       else "-")
            quality = ("-" if r["arm"] == "floor" else
                       f"{r['map50_95']:.3f} / {r['map50']:.3f}")
            extra = "; ".join(x for x in (r.get("config"), (
                None if r["arm"] == "floor" else f"{r.get('detections', 0)} boxes")) if x)
            rows.append(f"| {r['arm']} | {r['elapsed_s']:.2f} | {cold} | {rate:.1f} | "
                        f"{r['paired_ratio']:.2f}x | {warm_vs} | {cold_vs} | {quality} | "
                        f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_rss_mib']:+.0f} | "
                        f"{extra} |")
        tiles = results[0].get("tiles_n", "?")
        parts.append(
            f"**{size} x {size} px** ({size * size / 1e6:.1f} MP, {tiles} tiles):\n\n"
            "| arm | warm (s) | cold (s) | tiles/s (warm) | warm / floor (paired) | "
            "speed-up vs sahi, warm (paired) | speed-up vs sahi, cold | mAP50-95 / mAP50 | "
            "peak RSS (MiB) | RSS growth (MiB) | notes |\n"
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|\n" + "\n".join(rows) + "\n")
    tables = "\n".join(parts)
    return f"""{SECTION_BEGIN}
## Inference

Model: {model_note}. Scenes: synthetic, 0.5 m GSD, two classes plus unannotated decoys.
Every arm: {TILE_PX} px slices with {OVERLAP} overlap, confidence {CONF}, device
{args.device}; mAP against the scene's ground truth with `retrain_lib.stages.evaluate`
(pycocotools). {args.repeats} run(s) per arm, interleaved; with several, the fastest counts.

Machine: {machine()}. {load}

{tables}
- **warm**: wall time of the second detection call in the arm's process (model loaded,
  first call done): a service that processes many scenes. **cold**: the first call after
  loading the model: one `autoretrain detect` process per scene (SAHI sets Ultralytics'
  predictor up lazily on its first call; torch builds its kernels for each new batch shape).
- **warm / floor (paired)**: after its timed calls, each arm's process alternates three
  times between the floor and one more warm call of the arm and keeps the median ratio, so
  that other load on the machine hits both alike (target for `detect`: <= 1.2x).
  **speed-up vs sahi, warm**: SAHI's paired ratio / the arm's (target for `detect`: >= 2x);
  **cold**: SAHI's cold time / the arm's.
- **floor**: forward passes only over tiles already in memory (upload + forward; no NMS,
  no reading), at the best of torch threads (1 or all cores) x batch (1, 4, 8) on 8 tiles.
  `detect` and `sahi_tuned` run with the floor's best (notes: threads t / batch b);
  `sahi` and `sahi_default` run as they come (Ultralytics sets torch's threads on import;
  SAHI predicts one slice at a time).
- **peak RSS**: the arm process's high-water mark (`ru_maxrss`) after its timed calls,
  before the paired floor loads tiles; **RSS growth**: peak minus the RSS right after the
  model was loaded. `detect` reads windows, so its growth does not follow the scene size;
  SAHI decodes the whole scene first, and the floor holds every tile.
- GPU: the same comparison runs on a GPU host with `--device 0` (FP16 for `detect` and the
  floor; SAHI as it comes); not measured here, as this machine has no GPU.

Reproduce: `{command}`
{SECTION_END}
"""


def write_docs(section: str) -> None:
    write_section(section, "inference")


def train_model_in_child(out: Path) -> Path:
    """:func:`train_model` in a process of its own. Linux carries a process's RSS high-water
    mark (``ru_maxrss``) into the children it forks, so training here would inflate every
    arm's measured peak."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "import inference; print('WEIGHTS', inference.train_model(Path(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
                          check=True, stdout=subprocess.PIPE, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("WEIGHTS ")][-1]
    return Path(line.split(" ", 1)[1])


def parent_main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_ultralytics(out / "yolo-config")
    weights = train_model_in_child(out)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    sizes = [args.size, args.size * 2]  # the second has 4x the area
    load_before = os.getloadavg()[0]
    by_size: dict[int, list[dict[str, Any]]] = {}
    for size in sizes:
        scene, truth = make_scene(out, size)
        if size != sizes[0]:  # the larger scene shows scaling; the SAHI variants add little
            arms = [a for a in arms if a in args.large_arms.split(",")]
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        tuned: tuple[int, int] | None = None
        for _ in range(args.repeats):
            for arm in arms:
                result = run_arm(arm, args, weights, scene, tuned)
                if arm == "floor" and tuned is None and "config" in result:
                    # detect and sahi_tuned get the floor's best threads and batch.
                    threads, batch = result["config"].split("t/b")
                    tuned = (int(threads), int(batch))
                print(json.dumps({k: v for k, v in result.items()
                                  if k not in ("boxes", "scores", "classes")}), flush=True)
                runs[arm].append(result)
        best: dict[str, dict[str, Any]] = {}
        for arm, results in runs.items():
            ok = [r for r in results if "failed" not in r]
            if not ok:
                best[arm] = results[0]
                continue
            # Fastest warm run; cold is the fastest first call; the paired ratio is the
            # median over runs (each itself a median of back-to-back rounds).
            best[arm] = dict(min(ok, key=lambda r: r["elapsed_s"]))
            colds = [r["cold_s"] for r in ok if r.get("cold_s")]
            best[arm]["cold_s"] = min(colds) if colds else None
            best[arm]["paired_ratio"] = float(np.median([r["paired_ratio"] for r in ok]))
            best[arm]["peak_mib"] = max(r["peak_mib"] for r in ok)
        n_tiles = next((r["tiles"] for r in best.values() if "tiles" in r), None)
        rows = []
        for arm in arms:
            r = best[arm]
            if "failed" not in r:
                r["tiles_n"] = n_tiles
                if "boxes" in r:
                    r.update(score(r, truth, scene))
                    for key in ("boxes", "scores", "classes"):
                        r.pop(key)
            rows.append(r)
        by_size[size] = rows
    note = (f"YOLO11n from scratch, {TRAIN['epochs']} epochs at {TRAIN['imgsz']} px on "
            f"{TRAIN['chip']} px chips of {TRAIN['scenes']} synthetic {TRAIN['size']} px "
            "scenes (cached)")
    command = "python benchmarks/inference.py " + " ".join(args.raw_args)
    load = (f"Load average (1 min) before / after: {load_before:.1f} / "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    section = render(by_size, args, note, command, load)
    print(section)
    (out / "inference.json").write_text(json.dumps(by_size, indent=2) + "\n")
    if args.write_docs:
        write_docs(section)
        print(f"updated {DOCS}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2560,
                        help="Edge of the first scene in pixels; the second is twice as wide.")
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated arms to run.")
    parser.add_argument("--large-arms", default="floor,detect,sahi",
                        help="Arms also run on the scene with 4x the area.")
    parser.add_argument("--batch", type=int, default=None,
                        help="Tiles per batch for detect and sahi_tuned (default: the floor's "
                        "best batch and thread count).")
    parser.add_argument("--floor-batch", type=int, default=None,
                        help="Fix the floor's batch instead of sweeping 1, 4, 8.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per arm; best counts.")
    parser.add_argument("--device", default="cpu", help="'cpu' or a CUDA index like '0'.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Scratch folder (gitignored).")
    parser.add_argument("--write-docs", action="store_true",
                        help="Replace the Inference section of docs/benchmarks.md.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.raw_args = [a for a in sys.argv[1:] if a != "--write-docs"]
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
