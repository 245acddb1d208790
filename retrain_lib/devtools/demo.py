"""The demo behind ``make demo``, and the local Airflow + MLflow stack behind ``autoretrain up``.

The demo runs two real retraining cycles through Airflow on embedded defaults, everything
under one folder (``--root``):

- ``storage/``: the storage root (local directory); ``mlflow.db`` + ``mlartifacts/``: MLflow;
  ``airflow/``: ``AIRFLOW_HOME`` with a SQLite metadata database; ``configs/``: the demo's
  object-type config; ``scratch/``: working files; ``logs/``: the full output of each run.
- **Cycle 1**: synthetic drops of region A (vegetated), plus one broken drop that ingest must
  quarantine, then ``airflow dags test retrain_<type>``: the DAG file parsed from ``dags/`` and
  the run executed by Airflow's ``dag.test()``, the same task code the scheduler runs.
- **Cycle 2**: drops of region B (arid), where the cycle-1 model is weak, then a second run:
  hard examples mined from the champion's mistakes, a warm start from the champion, and the
  promotion gate on the frozen test scenes of both regions.

The demo's config is the shipped one scaled down so that both cycles fit in minutes on a
2-core CPU (256 px chips, one candidate, a low trigger threshold); :class:`DemoSize` holds the
knobs the ``autoretrain demo`` flags expose.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from retrain_lib.core.config import (
    ObjectTypeConfig,
    load_object_type_config,
    parse_object_type_config,
)
from retrain_lib.core.errors import ConfigError, RetrainError
from retrain_lib.core.layout import report_key
from retrain_lib.cycle.results import CycleReport, ModelScores
from retrain_lib.cycle.timing import describe_stage_times
from retrain_lib.devtools.local_stack import (
    TASK_STARTED,
    DagRunOutcome,
    LocalStack,
    project_folders,
)

__all__ = [
    "CycleOutcome",
    "DemoResult",
    "DemoSize",
    "decision_lines",
    "demo_config",
    "model_rows",
    "run_demo",
    "summary_rows",
]

DEMO_MARKER = ".autoretrain-demo"
_DEMO_OUTPUTS = ("storage", "airflow", "configs", "scratch", "logs", "mlartifacts", "mlflow.db")
_EPOCH = re.compile(r"\s(\d+)/(\d+)\s+[\d.]+G\s")


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; the defaults fit both cycles in minutes on a 2-core CPU."""

    scenes: int = 6
    """Scenes per region (one per region joins the frozen test set)."""
    size: int = 768
    """Scene edge in pixels (0.5 m per pixel)."""
    objects_per_class: int = 16
    decoys: int = 8
    epochs: int = 40
    """Epochs of cycle 1, which trains from scratch."""
    finetune_epochs: int = 20
    """Epochs of cycle 2, warm-started from the champion."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("scenes", "size", "epochs", "finetune_epochs"):
            if getattr(self, name) < (2 if name == "scenes" else 1):
                raise ConfigError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; "
                                  f"expected at least {2 if name == 'scenes' else 1}")
        if self.size < 256:
            raise ConfigError(f"--size: got {self.size}; expected at least 256 (the chip size)")


def demo_config(base: ObjectTypeConfig, size: DemoSize) -> dict[str, Any]:
    """The demo's config: ``base`` (a shipped config) scaled down to demo size.

    256 px chips trained at 256 px, one candidate tuned for few, small objects (AdamW, no mosaic,
    mild scale jitter so that 14 px cars stay visible), a trigger of 10 annotations, mining
    capped so cycle 2 stays short, the local runner on the CPU. Schedule, classes, the
    promotion gate and everything else stay as shipped.
    """
    data = base.model_dump(mode="json", exclude_defaults=False)
    data["description"] = f"Demo-sized copy of the shipped '{base.name}' config."
    data["trigger"] = {"min_new_annotations": 10,
                       "max_days_without_training": base.trigger.max_days_without_training}
    data["tiling"].update(tile_size=256, tile_size_m=None, overlap=0.2, workers=2)
    data["training"].update(
        initial_model="yolo11n.yaml", warm_start=True, epochs=size.epochs, imgsz=256, batch=4,
        device="cpu", workers=0, seed=size.seed,
        candidates=[{"name": "demo", "overrides": {
            "optimizer": "AdamW", "lr0": 0.005, "warmup_epochs": 1, "mosaic": 0.0,
            "scale": 0.2}}])
    data["mining"].update(max_per_scene=15, max_per_cycle=60, oversample=2)
    data["dataset"].update(test_scene_fraction=0.2, val_fraction=0.2, seed=size.seed)
    data["runner"] = {"kind": "local"}
    plain: dict[str, Any] = json.loads(json.dumps(data))  # plain types only, for YAML
    return plain


def _write_config(path: Path, data: Mapping[str, Any], source: Path) -> ObjectTypeConfig:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by 'autoretrain demo' from {source.name}: the shipped config scaled "
              "down to demo size.\n# Every key is documented in docs/configuration.md.\n")
    path.write_text(header + yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    parse_object_type_config(dict(data), str(path))
    return load_object_type_config(path)


def _prepare_root(root: Path) -> None:
    """Start from a clean demo folder; never delete what the demo did not make."""
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).exists():
            raise ConfigError(f"--root {root}: the folder holds files the demo did not make; "
                              "choose an empty or new folder")
        for name in _DEMO_OUTPUTS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("made by 'autoretrain demo'; it may delete this folder's "
                                    "demo outputs when run again\n", encoding="utf-8")


def _write_drop(incoming: Path, cfg: ObjectTypeConfig, drop_id: str, region: str, *,
                scenes: int, size_px: int, objects_per_class: int, decoys: int, seed: int
                ) -> list[dict[str, Any]]:
    from retrain_lib.devtools.synthetic import SceneSpec, make_drop

    specs = [SceneSpec(scene_id=f"scene{i:02d}", width=size_px, height=size_px,
                       classes=tuple(cfg.classes), region=region,  # type: ignore[arg-type]
                       objects_per_class=objects_per_class, decoys=decoys,
                       seed=seed * 1000 + i) for i in range(scenes)]
    made = make_drop(incoming / drop_id, specs)
    (incoming / drop_id / "drop.json").write_text(
        json.dumps({"region": region, "source": "synthetic demo"}), encoding="utf-8")
    return [{"drop": drop_id, "scene": s.path.name, "region": region, **s.counts()}
            for s in made]


@dataclass(frozen=True)
class CycleOutcome:
    """One demo cycle: what was dropped, the DAG run, and the cycle report it wrote."""

    name: str
    drops: tuple[dict[str, Any], ...]
    run: DagRunOutcome
    report: CycleReport


@dataclass(frozen=True)
class DemoResult:
    """What the demo made and where."""

    root: Path
    stack: LocalStack
    config: ObjectTypeConfig
    config_path: Path
    cycles: tuple[CycleOutcome, ...]
    seconds: float

    @property
    def object_type(self) -> str:
        """The demo's object type."""
        return self.config.name


class _Progress:
    """Turns the runs' output into a few progress lines: task starts and training epochs."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seen: set[tuple[str, str]] = set()
        self.epoch = 0

    def __call__(self, line: str) -> None:
        if found := TASK_STARTED.search(line):
            task, index = found.groups()
            if (task, index) not in self.seen and (task, "*") not in self.seen:
                self.seen.add((task, "*" if index != "-1" else index))
                self.log(f"  task {task}" + (" (one per item)" if index != "-1" else ""))
                self.epoch = 0
        elif "retrain_lib.training.runners" in line and (found := _EPOCH.search(line)):
            epoch, total = int(found.group(1)), int(found.group(2))
            step = max(1, total // 8)
            if epoch != self.epoch and (epoch % step == 0 or epoch == total):
                self.log(f"    epoch {epoch}/{total}")
            self.epoch = epoch


def run_demo(root: str | Path, *, configs_dir: str | Path | None = None,
             object_type: str = "vehicle", size: DemoSize | None = None,
             database_url: str | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Run the two-cycle demo under ``root`` (made clean first; see the module docstring).

    Raises:
        ConfigError: a bad size, an unknown object type, or a root holding foreign files.
        RetrainError: a cycle's DAG run failed; the message names the task and the log file.
    """
    started = time.monotonic()
    size = size or DemoSize()
    root = Path(root).expanduser().resolve()
    dags, plugins, shipped = project_folders()
    source = Path(configs_dir or shipped) / f"{object_type}.yaml"
    base = load_object_type_config(source)
    _prepare_root(root)
    config_path = root / "configs" / f"{object_type}.yaml"
    cfg = _write_config(config_path, demo_config(base, size), source)
    stack = LocalStack(root=root, dags_folder=dags, plugins_folder=plugins,
                       configs_dir=config_path.parent, database_url=database_url,
                       task_retries=0)
    log(f"demo config {config_path} (from {source})")
    log(f"creating the Airflow metadata database ({stack.metadata_url.split(':', 1)[0]})")
    stack.migrate()
    incoming = stack.storage_root / "incoming" / cfg.name
    progress = _Progress(log)
    cycles: list[CycleOutcome] = []
    plan = (("cycle 1", "vegetated", "a", size.epochs, True),
            ("cycle 2", "arid", "b", size.finetune_epochs, False))
    for name, region, letter, epochs, with_broken in plan:
        seed = size.seed * 10 + len(cycles) + 1
        drops = _write_drop(incoming, cfg, f"region-{letter}-{region}", region,
                            scenes=size.scenes, size_px=size.size,
                            objects_per_class=size.objects_per_class, decoys=size.decoys,
                            seed=seed)
        if with_broken:
            # An analyst's mistake: a scene without its annotations; ingest quarantines it.
            broken = _write_drop(incoming, cfg, "region-a-broken", region, scenes=1,
                                 size_px=256, objects_per_class=2, decoys=1, seed=seed + 100)
            (incoming / "region-a-broken" / "scene00.geojson").unlink()
            drops += [{**d, "broken": "annotations missing"} for d in broken]
        log(f"{name}: dropped {size.scenes} {region} scene(s) of {size.size} px into {incoming}"
            + (" plus one broken drop" if with_broken else ""))
        log(f"{name}: airflow dags test retrain_{cfg.name} (epochs {epochs})")
        run = stack.run_dag(f"retrain_{cfg.name}", conf={"epochs": epochs}, on_line=progress)
        progress.seen.clear()
        report_path = stack.storage_root / report_key(cfg.name, run.cycle_id)
        if run.state != "success" or not report_path.exists():
            raise RetrainError(f"{name}: the DAG run {run.run_id} {run.state}"
                               + (f": {run.error}" if run.error else "")
                               + f"; full log: {run.log}")
        report = CycleReport.from_json(json.loads(report_path.read_text(encoding="utf-8")))
        log(f"{name}: {report.status} in {run.seconds:.0f} s")
        cycles.append(CycleOutcome(name, tuple(drops), run, report))
    return DemoResult(root, stack, cfg, config_path, tuple(cycles),
                      round(time.monotonic() - started, 1))


def summary_rows(report: CycleReport) -> Iterator[tuple[str, str]]:
    """(label, value) rows that summarise one cycle report, for the demo's table."""
    tiles = report.tiles or []
    if report.ingest:
        yield "new scenes", (f"{len(report.ingest.scene_ids)} cataloged, "
                             f"{report.ingest.quarantined} drop(s) quarantined")
    new_chips = sum(t.tiles_written for t in tiles if not t.reused)
    yield "chips", (f"{new_chips} new ({sum(t.tiles_written for t in tiles)} over "
                    f"{len(tiles)} scenes)")
    counts = report.mine.counts if report.mine else {}
    yield "hard examples", (", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
                            if counts else str(report.mine.skipped if report.mine else "none"))
    if report.dataset:
        yield "dataset", (f"{report.dataset.version}: {report.dataset.train_images} train / "
                          f"{report.dataset.val_images} val images, test scenes "
                          f"{', '.join(report.dataset.test_scenes)}")
    if report.stage_times:
        times = report.stage_times
        total = sum(t.wall_s for t in times.values())
        outside = total - (times["train"].wall_s if "train" in times else 0.0)
        yield "time per stage", (describe_stage_times(times) + (
            f"; outside training {outside:.0f} s ({outside / total:.0%})" if total else ""))


def model_rows(report: CycleReport) -> list[tuple[str, ModelScores]]:
    """(model label, scores) for every candidate and the champion of one cycle report."""
    if report.evaluation is None:
        return []
    versions = report.promotion.versions if report.promotion else {}
    rows = [(f"candidate {name}" + (f" (v{versions[name]})" if name in versions else ""), scores)
            for name, scores in report.evaluation.candidates.items()]
    if report.evaluation.champion:
        champion = report.evaluation.champion
        rows.append((f"champion v{champion.version}", champion.metrics))
    return rows


def decision_lines(report: CycleReport) -> Sequence[str]:
    """The promotion decision of one cycle, with its reasons."""
    promotion = report.promotion
    if promotion is None:
        return [f"no training: {report.check.reason if report.check else ''}"]
    promoted, current = promotion.promoted_version, promotion.champion_version
    head = (f"promoted v{promoted} to champion" if promoted
            else f"kept champion v{current}" if current else "no champion yet")
    return [head, *(f"v{v}: {d.reason}" for v, d in promotion.decisions.items())]
