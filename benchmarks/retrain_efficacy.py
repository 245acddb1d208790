"""Retraining-efficacy benchmark: hard-example mining against a no-mining control over cycles.

The synthetic region-shift scenario with decoys (look-alikes that are not annotated):

- **cycle 1**: region A (vegetated) scenes arrive; a model is trained from scratch and becomes
  the champion. Nothing can be mined yet (there is no champion to learn from), so both arms'
  cycle 1 is the same and it is run once; both arms start from its champion.
- **cycles 2..K**: new region-B (arid) scenes arrive each cycle, the same scenes for both arms.
  - ``mining``: the pipeline as configured: the champion's false positives and false
    negatives on the new scenes become hard chips (oversampled) next to the new data.
  - ``control``: mining off; the training list is padded with repeats of regular chips
    (``dataset.min_train_images``) to the mining arm's number of training images, with the
    same epochs, so both arms get the same training budget.

Each cycle is a whole :func:`retrain_lib.cycle.run_cycle` (ingest, tile, mine, assemble,
train, evaluate, register, promote) on its own storage root and MLflow database. After every
cycle, each arm's champion (what would be deployed) is scored on evaluation scenes of both
regions that no arm ever sees (their own seeds, never dropped), so every cycle and arm is
measured on the same scenes. Repeated over seeds (data, splits and training all follow the
seed); the report gives mean ± standard deviation over seeds, and a plot.

    python benchmarks/retrain_efficacy.py                  # 3 seeds, 3 cycles, CPU
    python benchmarks/retrain_efficacy.py --write-docs     # also update docs/benchmarks.md
    python benchmarks/retrain_efficacy.py --report-only --write-docs   # re-aggregate
    python benchmarks/retrain_efficacy.py --device 0 --scene-size 1536 --epochs 80 \\
        --finetune-epochs 40 --seeds 0 1 2 3 4 --cycles 5    # bigger, on a GPU

Each seed's results are written to ``<out>/seed<N>/result.json`` as soon as it finishes, so
seeds can also be run one by one (``--seeds 1``) and aggregated afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from docs_section import markers, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out" / "retrain_efficacy"
PLOT = REPO_ROOT / "docs" / "img" / "retrain_efficacy.png"
ARMS = ("mining", "control")
REGION_A, REGION_B = "vegetated", "arid"
METRICS = ("map50", "map50_95")
SECTION = "retrain-efficacy"
TARGET_GAIN_B, TARGET_LOSS_A = 0.03, 0.01


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_config(args: argparse.Namespace, seed: int) -> Any:
    """The demo's scaled-down vehicle config, with this run's sizes."""
    from retrain_lib.core.config import load_object_type_config, parse_object_type_config
    from retrain_lib.devtools.demo import DemoSize, demo_config
    from retrain_lib.devtools.local_stack import project_folders

    _, _, shipped = project_folders()
    base = load_object_type_config(shipped / "vehicle.yaml")
    data = demo_config(base, DemoSize(epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                      seed=seed))
    data["trigger"]["min_new_annotations"] = 1
    data["training"].update(device=args.device, batch=args.batch)
    data["mining"].update(max_per_scene=args.hard_per_scene, max_per_cycle=args.hard_per_cycle,
                          oversample=args.oversample)
    # One test scene per region, held out by the pipeline's own policy for its promotion
    # gate; the benchmark scores on its own evaluation scenes.
    data["dataset"]["test_scene_fraction"] = 0.1
    data["dataset"]["max_train_images"] = args.max_train_images
    return parse_object_type_config(data, "retrain_efficacy")


def with_arm(cfg: Any, arm: str, train_images: int = 0) -> Any:
    if arm == "mining":
        return cfg
    return cfg.model_copy(update={
        "mining": cfg.mining.model_copy(update={"enabled": False}),
        "dataset": cfg.dataset.model_copy(update={"min_train_images": train_images})})


def write_scenes(folder: Path, classes: Sequence[str], region: str, count: int, prefix: str,
                 args: argparse.Namespace, seed: int) -> list[Any]:
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    specs = [SceneSpec(scene_id=f"{prefix}{i:02d}", width=args.scene_size,
                       height=args.scene_size, classes=tuple(classes), region=region,  # type: ignore[arg-type]
                       objects_per_class=args.objects_per_class, decoys=args.decoys,
                       clusters=args.clusters, seed=seed * 100_003 + i) for i in range(count)]
    scenes = make_drop(folder, specs)
    (folder / "drop.json").write_text(json.dumps({"region": region, "source": "benchmark"}),
                                      encoding="utf-8")
    return scenes


def settings_for(root: Path) -> Any:
    from retrain_lib.cycle.settings import CycleSettings

    return CycleSettings(storage_uri=str(root / "storage"),
                         mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
                         scratch=str(root / "scratch"))


def score_champion(cfg: Any, settings: Any, tests: list[tuple[str, Path, Path, str]]
                   ) -> dict[str, Any]:
    from retrain_lib.cycle.champion import champion_detector
    from retrain_lib.cycle.models import score_detector

    champion = champion_detector(cfg, settings)
    if champion is None:  # nothing deployed detects nothing
        return {"version": None, "regions": {r: dict.fromkeys(METRICS, 0.0)
                                             for r in (REGION_A, REGION_B)}}
    version, detector = champion
    scores = score_detector(detector, cfg, tests)
    return {"version": version,
            "regions": {r: {m: getattr(region, m) for m in METRICS}
                        for r, region in scores.regions.items()}}


def cycle_row(report: Any, scores: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One cycle of one arm: what it did (``report`` from ``run_cycle``) and its champion."""
    written, stages = report
    counts = stages.mine.counts if stages.mine else {}
    return {"champion_version": scores["version"], "regions": scores["regions"],
            "status": written.status, "promoted": written.promoted_version is not None,
            "train_images": stages.dataset.train_images if stages.dataset else None,
            "hard_chips": sum(counts.values()), "hard_by_reason": counts,
            "seconds": round(seconds, 1)}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Cycle 1 once, then both arms through cycles 2..K; writes ``seed<N>/result.json``."""
    from retrain_lib.cycle.run import run_cycle

    started = time.monotonic()
    root = args.out / f"seed{seed}"
    if root.exists():
        shutil.rmtree(root)
    cfg = make_config(args, seed)
    incoming = Path("incoming") / cfg.name
    evaluation = []
    for letter, region in (("a", REGION_A), ("b", REGION_B)):
        made = write_scenes(root / "eval" / region, cfg.classes, region, args.eval_scenes,
                            f"eval-{letter}", args, seed * 7 + 900 + ord(letter))
        evaluation += [(s.path.stem, s.path, s.annotations_path, region) for s in made]

    shared = root / "cycle1"
    log(f"seed {seed}: cycle 1, {args.scenes_a} region-A scenes, {args.epochs} epochs")
    write_scenes(shared / "storage" / incoming / "region-a", cfg.classes, REGION_A,
                 args.scenes_a, "a1-", args, seed * 1000 + 1)
    t0 = time.monotonic()
    report = run_cycle(cfg, settings_for(shared), "c1", force=True, epochs=args.epochs)
    first = cycle_row(report, score_champion(cfg, settings_for(shared), evaluation),
                      time.monotonic() - t0)
    log(f"seed {seed}: cycle 1 {first['status']}, champion v{first['champion_version']}: "
        + summary(first))
    arms: dict[str, list[dict[str, Any]]] = {arm: [first] for arm in args.arms}
    for arm in args.arms:
        shutil.copytree(shared, root / arm, ignore=shutil.ignore_patterns("scratch"))

    for k in range(2, args.cycles + 1):
        drop = root / "drops" / f"region-b-{k}"
        write_scenes(drop, cfg.classes, REGION_B, args.scenes_b, f"b{k}-", args,
                     seed * 1000 + k)
        train_images = 0
        for arm in args.arms:  # mining first: the control matches its training budget
            arm_root = root / arm
            shutil.copytree(drop, arm_root / "storage" / incoming / drop.name)
            arm_cfg = with_arm(cfg, arm, train_images)
            log(f"seed {seed}: cycle {k}, {arm}: {args.scenes_b} new region-B scenes")
            t0 = time.monotonic()
            report = run_cycle(arm_cfg, settings_for(arm_root), f"c{k}", force=True,
                               epochs=args.finetune_epochs)
            row = cycle_row(report, score_champion(arm_cfg, settings_for(arm_root),
                                                   evaluation), time.monotonic() - t0)
            arms[arm].append(row)
            if arm == "mining":
                train_images = int(row["train_images"] or 0)
            log(f"seed {seed}: cycle {k}, {arm}: {row['status']}, {row['train_images']} "
                f"train images, {row['hard_chips']} hard chips, champion "
                f"v{row['champion_version']}: {summary(row)}")
    result = {"seed": seed, "arms": arms, "seconds": round(time.monotonic() - started, 1),
              "settings": settings_dict(args)}
    (root / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not args.keep:
        for name in ("cycle1", *args.arms, "drops", "eval"):
            shutil.rmtree(root / name, ignore_errors=True)
    return result


def summary(row: dict[str, Any]) -> str:
    return ", ".join(f"{region} mAP50 {m['map50']:.3f}" for region, m in
                     sorted(row["regions"].items()))


SETTINGS = ("cycles", "scenes_a", "scenes_b", "scene_size", "objects_per_class", "decoys",
            "clusters", "max_train_images",
            "eval_scenes", "epochs", "finetune_epochs", "batch", "oversample",
            "hard_per_scene", "hard_per_cycle", "device")


def settings_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SETTINGS}


# --------------------------------------------------------------------------- report


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def series(results: Sequence[dict[str, Any]], arm: str, cycle: int, region: str,
           metric: str) -> list[float]:
    return [r["arms"][arm][cycle - 1]["regions"][region][metric] for r in results]


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    cycles = min(len(r["arms"]["mining"]) for r in results)
    last = cycles
    gain_b = [m - c for m, c in zip(series(results, "mining", last, REGION_B, "map50"),
                                    series(results, "control", last, REGION_B, "map50"),
                                    strict=True)]
    loss_a = [c - m for m, c in zip(series(results, "mining", last, REGION_A, "map50"),
                                    series(results, "control", last, REGION_A, "map50"),
                                    strict=True)]
    return {"cycles": cycles, "seeds": [r["seed"] for r in results],
            "gain_b_map50": mean_sd(gain_b), "loss_a_map50": mean_sd(loss_a),
            "target_met": (statistics.fmean(gain_b) >= TARGET_GAIN_B
                           and statistics.fmean(loss_a) <= TARGET_LOSS_A)}


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = aggregate(results)["cycles"]
    xs = list(range(1, cycles + 1))
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    for col, (region, label) in enumerate(((REGION_A, "region A (vegetated)"),
                                           (REGION_B, "region B (arid, new)"))):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for arm, style in (("mining", "o-"), ("control", "s--")):
                stats = [mean_sd(series(results, arm, c, region, metric)) for c in xs]
                ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style,
                            capsize=4, label=arm)
            ax.set_title(f"{label}: {metric.replace('map', 'mAP').replace('_', '-')}")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("cycle")
                ax.set_xticks(xs)
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"Champion after each cycle, mean ± sd over {len(results)} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results: Sequence[dict[str, Any]], wall_s: float | None, name: str = "",
           command: str = "") -> str:
    begin, end = markers(section_name(name))
    agg = aggregate(results)
    settings = results[0]["settings"]
    n = len(results)
    title = "Retraining efficacy: hard-example mining vs control" + (f" ({name})" if name
                                                                      else "")
    lines = [begin, f"## {title}", "",
             f"`python benchmarks/retrain_efficacy.py {command}--write-docs`. The region-shift "
             "scenario "
             "with decoys: cycle 1 trains a champion from scratch on region A (vegetated); "
             f"cycles 2..{agg['cycles']} bring new region-B (arid) scenes, the same for both "
             "arms. **mining** runs the pipeline as configured (the champion's false positives "
             "and negatives on the new scenes become hard chips); **control** turns mining off "
             "and pads its training list with repeats of regular chips to the mining arm's "
             "number of training images, with the same epochs. Every cycle is a whole "
             "`run_cycle` (ingest, tile, mine, assemble, train, evaluate, register, promote "
             "through the gate). Scores: each arm's champion after the cycle, on "
             f"{settings['eval_scenes']} evaluation scenes per region that no arm ever trains "
             f"or gates on; mean ± sd over {n} seeds ({', '.join(map(str, agg['seeds']))}).",
             "",
             f"Settings: {settings['scenes_a']} region-A scenes, then {settings['scenes_b']} "
             f"region-B scenes per cycle, {settings['scene_size']} px (0.5 m), "
             f"{settings['objects_per_class']} objects per class and {settings['decoys']} "
             f"decoys per scene{layout(settings.get('clusters', 0))}; "
             f"{settings['epochs']} epochs from scratch, then "
             f"{settings['finetune_epochs']} warm-started, 256 px chips, YOLO11n, device "
             f"`{settings['device']}`; hard chips ×{settings['oversample']}, at most "
             f"{settings['hard_per_scene']} per scene and {settings['hard_per_cycle']} per "
             f"cycle; {budget(settings.get('max_train_images', 0))}.", "",
             "| cycle | region | mAP50 mining | mAP50 control | Δ mAP50 | mAP50-95 mining "
             "| mAP50-95 control |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in range(1, agg["cycles"] + 1):
        for region in (REGION_A, REGION_B):
            m50 = series(results, "mining", c, region, "map50")
            c50 = series(results, "control", c, region, "map50")
            delta = [a - b for a, b in zip(m50, c50, strict=True)]
            lines.append(
                f"| {c} | {region} | {fmt(m50)} | {fmt(c50)} | {fmt(delta)} | "
                f"{fmt(series(results, 'mining', c, region, 'map50_95'))} | "
                f"{fmt(series(results, 'control', c, region, 'map50_95'))} |")
    lines += ["", "| arm | cycle | train images | hard chips | promoted (of seeds) | "
              "cycle wall time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        for c in range(2, agg["cycles"] + 1):
            rows = [r["arms"][arm][c - 1] for r in results]
            lines.append(f"| {arm} | {c} | {fmt([r['train_images'] for r in rows], 0)} | "
                         f"{fmt([r['hard_chips'] for r in rows], 0)} | "
                         f"{sum(r['promoted'] for r in rows)}/{n} | "
                         f"{fmt([r['seconds'] for r in rows], 0)} |")
    gain, loss = agg["gain_b_map50"], agg["loss_a_map50"]
    verdict = "met" if agg["target_met"] else "not met"
    lines += ["", f"![mAP per cycle and arm](img/{plot_path(name).name})", "",
              f"By cycle {agg['cycles']}, mining minus control: region B mAP50 "
              f"{gain[0]:+.3f} ± {gain[1]:.3f}; region A mAP50 {-loss[0]:+.3f} ± {loss[1]:.3f}. "
              f"Target (at least +{TARGET_GAIN_B:.2f} on B, at most {TARGET_LOSS_A:.2f} lost on "
              f"A): **{verdict}**."]
    total = sum(r["seconds"] for r in results)
    lines += ["", f"{n} seeds took {total / 60:.1f} min"
              + (f" ({wall_s / 60:.1f} min wall for this invocation)" if wall_s else "")
              + f"; {platform.machine()}, {os.cpu_count()} CPU, Python "
              f"{platform.python_version()}.", end]
    return "\n".join(lines)


def budget(images: int) -> str:
    if not images:
        return "no training budget: every cycle trains on every chip so far"
    return (f"a training budget of {images} images per cycle for both arms "
            "(`dataset.max_train_images`; hard chips at most half of it)")


def layout(clusters: int) -> str:
    if not clusters:
        return " (objects spread over the scene)"
    return (f" (objects in {clusters} lots per scene, decoys scattered over the rest, so most "
            "decoys lie in empty chips the tiler keeps few of)")


def section_name(name: str) -> str:
    return SECTION + (f"-{name}" if name else "")


def plot_path(name: str) -> Path:
    return PLOT.with_name(PLOT.stem + (f"_{name}" if name else "") + PLOT.suffix)


def load_results(out: Path, seeds: Sequence[int]) -> list[dict[str, Any]]:
    results = []
    for seed in seeds:
        path = out / f"seed{seed}" / "result.json"
        if not path.exists():
            raise SystemExit(f"{path}: no result for seed {seed}; run it first")
        results.append(json.loads(path.read_text(encoding="utf-8")))
    return results


def changed_flags(parser: argparse.ArgumentParser, results: Sequence[dict[str, Any]],
                  name: str) -> str:
    """The results' settings that differ from the defaults, as command-line flags."""
    values = {**results[0]["settings"], "seeds": [r["seed"] for r in results], "name": name}
    flags = []
    for key, value in values.items():
        if value != parser.get_default(key):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            flags.append(f"--{key.replace('_', '-')} {shown} ")
    return "".join(flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cycles", type=int, default=3, help="cycles K (>= 2)")
    parser.add_argument("--scenes-a", type=int, default=6, help="region-A scenes in cycle 1")
    parser.add_argument("--scenes-b", type=int, default=4, help="region-B scenes per cycle")
    parser.add_argument("--scene-size", type=int, default=640, help="scene edge in pixels")
    parser.add_argument("--objects-per-class", type=int, default=12)
    parser.add_argument("--decoys", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=0,
                        help="0: objects spread over the scene; N: in N lots, decoys scattered")
    parser.add_argument("--eval-scenes", type=int, default=2, help="per region")
    parser.add_argument("--epochs", type=int, default=40, help="cycle 1, from scratch")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="later cycles")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--oversample", type=int, default=2, help="repeats of a hard chip")
    parser.add_argument("--max-train-images", type=int, default=0,
                        help="training budget per cycle, both arms (0: train on everything)")
    parser.add_argument("--hard-per-scene", type=int, default=15)
    parser.add_argument("--hard-per-cycle", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="cpu or a CUDA index such as 0")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", action="store_true", help="keep storage and MLflow files")
    parser.add_argument("--report-only", action="store_true",
                        help="aggregate the seeds' result.json files without running")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--name", default="", help="a variant's name: its own docs section "
                        "and plot (default: the main one)")
    args = parser.parse_args()
    args.arms = ARMS
    if args.cycles < 2:
        parser.error("--cycles: expected at least 2 (cycle 1 is region A only)")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    started = time.monotonic()
    if not args.report_only:
        for seed in args.seeds:
            run_seed(args, seed)
    results = load_results(args.out, args.seeds)
    wall = None if args.report_only else time.monotonic() - started
    section = render(results, wall, args.name, changed_flags(parser, results, args.name))
    print(section)
    if args.write_docs:
        plot(results, plot_path(args.name))
        write_section(section, section_name(args.name))


if __name__ == "__main__":
    main()
