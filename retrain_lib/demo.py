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
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from retrain_lib.config import ObjectTypeConfig, load_object_type_config, parse_object_type_config
from retrain_lib.errors import ConfigError, RetrainError

__all__ = [
    "CycleOutcome",
    "DagRunOutcome",
    "DemoResult",
    "DemoSize",
    "LocalStack",
    "demo_config",
    "project_folders",
    "run_demo",
    "run_up",
    "up_stack",
]

DEMO_MARKER = ".autoretrain-demo"
_DEMO_OUTPUTS = ("storage", "airflow", "configs", "scratch", "logs", "mlartifacts", "mlflow.db")
_STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\w+) map_index=(-?\d+)")
_FINISHED = re.compile(r"DagRun Finished: .*?run_id=([^,]+), .*?state=(\w+)")
_EPOCH = re.compile(r"\s(\d+)/(\d+)\s+[\d.]+G\s")
_FAILED_TASK = re.compile(r"(?:AirflowFailException|AirflowException): (.+?)(?: \[|$)")


def project_folders() -> tuple[Path, Path, Path]:
    """The checkout's ``dags/``, ``plugins/`` and ``configs/object_types/`` folders."""
    root = Path(__file__).resolve().parents[1]
    folders = (root / "dags", root / "plugins", root / "configs" / "object_types")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not found; the demo and 'autoretrain up' run "
                          "from a checkout of the project (pip install -e .)")
    return folders


# --------------------------------------------------------------------------- local stack


@dataclass(frozen=True)
class DagRunOutcome:
    """One finished ``airflow dags test`` run."""

    dag_id: str
    run_id: str
    logical_date: datetime
    state: str
    seconds: float
    log: Path
    tasks_started: tuple[str, ...] = ()
    error: str = ""

    @property
    def cycle_id(self) -> str:
        """The cycle id the tasks of this run used (see :func:`retrain_lib.cycle.run_cycle_id`)."""
        from retrain_lib.cycle import run_cycle_id

        return run_cycle_id(self.run_id, self.logical_date)


@dataclass(frozen=True)
class LocalStack:
    """Airflow (SQLite or a given database), MLflow (SQLite) and storage under one folder.

    Airflow reads its settings from the environment of each process this starts, so nothing
    here imports Airflow, and a caller's own Airflow settings are never touched.
    """

    root: Path
    dags_folder: Path
    plugins_folder: Path
    configs_dir: Path
    database_url: str | None = None
    task_retries: int | None = None
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def storage_root(self) -> Path:
        return self.root / "storage"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def metadata_url(self) -> str:
        return self.database_url or f"sqlite:///{self.airflow_home / 'airflow.db'}"

    def environment(self) -> dict[str, str]:
        """The variables that point Airflow, MLflow and retrain_lib at this stack."""
        env = {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AUTORETRAIN_CONFIGS": str(self.configs_dir),
            "AUTORETRAIN_STORAGE": str(self.storage_root),
            "AUTORETRAIN_SCRATCH": str(self.root / "scratch"),
            "AUTORETRAIN_MLFLOW_UI_URL": self.mlflow_ui_url,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PYTHONUNBUFFERED": "1",
            **dict(self.extra_env),
        }
        if self.task_retries is not None:
            env["AUTORETRAIN_TASK_RETRIES"] = str(self.task_retries)
        return env

    def process_env(self) -> dict[str, str]:
        """This process's environment with the stack's settings on top."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
        # `airflow standalone` starts its components as `airflow ...`: find this environment's.
        path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return {**env, "PATH": path, **self.environment()}

    def airflow(self, *args: str, check: bool = True, timeout_s: float | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run an ``airflow`` CLI command against this stack; output captured."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.process_env(),
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RetrainError(f"'airflow {' '.join(args)}' failed with exit code "
                               f"{proc.returncode}:\n{tail}")
        return proc

    def migrate(self) -> None:
        """Create or upgrade the Airflow metadata database."""
        self.airflow("db", "migrate")

    def run_dag(self, dag_id: str, *, conf: Mapping[str, Any] | None = None,
                logical_date: datetime | None = None, log_dir: Path | None = None,
                on_line: Callable[[str], None] | None = None) -> DagRunOutcome:
        """Run one DAG run with ``airflow dags test`` (Airflow's ``dag.test()``).

        The whole output goes to ``<log_dir>/<dag_id>-<time>.log``; ``on_line`` sees every
        line as it comes. A failed run is returned (``state='failed'``), not raised.
        """
        logical_date = logical_date or datetime.now(UTC)
        log_dir = log_dir or self.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / (f"{dag_id}-{logical_date.strftime('%Y%m%dT%H%M%S')}-run"
                              f"{datetime.now(UTC).strftime('%H%M%S%f')}.log")
        command = [sys.executable, "-m", "airflow", "dags", "test", dag_id,
                   logical_date.isoformat()]
        if conf:
            command += ["--conf", json.dumps(dict(conf))]
        started = time.monotonic()
        run_id, state, error = "", "", ""
        tasks: list[str] = []
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.Popen(command, env=self.process_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log_file.write(line)
                    if (found := _STARTED.search(line)) and found.group(1) not in tasks:
                        tasks.append(found.group(1))
                    if found := _FINISHED.search(line):
                        run_id, state = found.group(1), found.group(2)
                    if "AirflowFailException" in line or "Task failed with exception" in line:
                        error = error or _error_text(line)
                    if on_line is not None:
                        on_line(line)
                code = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
        if not state:
            state = "success" if code == 0 else "failed"
        if code != 0 and state != "failed":
            state = "failed"
        if not run_id:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise RetrainError(f"'airflow dags test {dag_id}' ran no DAG run (exit code "
                               f"{code}); the last lines of {log_path}:\n{tail}")
        return DagRunOutcome(dag_id, run_id, logical_date, state,
                             round(time.monotonic() - started, 1), log_path, tuple(tasks), error)


def _error_text(line: str) -> str:
    found = _FAILED_TASK.search(line)
    return found.group(1).strip() if found else ""


# --------------------------------------------------------------------------- demo


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
    return json.loads(json.dumps(data))  # plain types only, for YAML


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
    from retrain_lib.synthetic import SceneSpec, make_drop

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
    report: Mapping[str, Any]


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
        return self.config.name


class _Progress:
    """Turns the runs' output into a few progress lines: task starts and training epochs."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seen: set[tuple[str, str]] = set()
        self.epoch = 0

    def __call__(self, line: str) -> None:
        if found := _STARTED.search(line):
            task, index = found.groups()
            if (task, index) not in self.seen and (task, "*") not in self.seen:
                self.seen.add((task, "*" if index != "-1" else index))
                self.log(f"  task {task}" + (" (one per item)" if index != "-1" else ""))
                self.epoch = 0
        elif "retrain_lib.runners" in line and (found := _EPOCH.search(line)):
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
    cycles = []
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
        report_path = stack.storage_root / "cycles" / cfg.name / run.cycle_id / "report.json"
        if run.state != "success" or not report_path.exists():
            raise RetrainError(f"{name}: the DAG run {run.run_id} {run.state}"
                               + (f": {run.error}" if run.error else "")
                               + f"; full log: {run.log}")
        report = json.loads(report_path.read_text(encoding="utf-8"))
        log(f"{name}: {report['status']} in {run.seconds:.0f} s")
        cycles.append(CycleOutcome(name, tuple(drops), run, report))
    return DemoResult(root, stack, cfg, config_path, tuple(cycles),
                      round(time.monotonic() - started, 1))


def summary_rows(report: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(label, value) rows that summarise one cycle report, for the demo's table."""
    ingest = report.get("ingest") or {}
    tiles = report.get("tiles") or []
    mine = report.get("mine") or {}
    dataset = report.get("dataset") or {}
    yield "new scenes", (f"{len(ingest.get('scene_ids', []))} cataloged, "
                         f"{ingest.get('quarantined', 0)} drop(s) quarantined")
    new_chips = sum(t["tiles_written"] for t in tiles if not t.get("reused"))
    yield "chips", (f"{new_chips} new ({sum(t['tiles_written'] for t in tiles)} over "
                    f"{len(tiles)} scenes)")
    counts = mine.get("counts") or {}
    yield "hard examples", (", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
                            if counts else str(mine.get("skipped", "none")))
    if dataset:
        yield "dataset", (f"{dataset['version']}: {dataset['train_images']} train / "
                          f"{dataset['val_images']} val images, test scenes "
                          f"{', '.join(dataset['test_scenes'])}")


def model_rows(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(model label, metrics) for every candidate and the champion of one cycle report."""
    evaluation = report.get("evaluation") or {}
    versions = (report.get("promotion") or {}).get("versions") or {}
    rows: list[tuple[str, Mapping[str, Any]]] = [
        (f"candidate {name}" + (f" (v{versions[name]})" if name in versions else ""), metrics)
        for name, metrics in (evaluation.get("candidates") or {}).items()]
    if evaluation.get("champion"):
        champion = evaluation["champion"]
        rows.append((f"champion v{champion['version']}", champion["metrics"]))
    return rows


def decision_lines(report: Mapping[str, Any]) -> Sequence[str]:
    """The promotion decision of one cycle, with its reasons."""
    promotion = report.get("promotion") or {}
    if not promotion:
        return [f"no training: {(report.get('check') or {}).get('reason', '')}"]
    promoted = promotion.get("promoted_version")
    current = promotion.get("champion_version")
    head = (f"promoted v{promoted} to champion" if promoted
            else f"kept champion v{current}" if current else "no champion yet")
    reasons = [f"v{v}: {d['reason'] if isinstance(d, dict) else d}"
               for v, d in (promotion.get("decisions") or {}).items()]
    return [head, *reasons]


# --------------------------------------------------------------------------- up


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def up_stack(root: str | Path, *, configs: str | Path | None = None, airflow_port: int = 8080,
             mlflow_port: int = 5000) -> LocalStack:
    """The stack ``autoretrain up`` serves: the demo's folder, and its configs if it has them."""
    root = Path(root).expanduser().resolve()
    dags, plugins, shipped = project_folders()
    configs_dir = Path(configs) if configs else (
        root / "configs" if (root / "configs").is_dir() else shipped)
    return LocalStack(
        root=root, dags_folder=dags, plugins_folder=plugins, configs_dir=configs_dir.resolve(),
        mlflow_ui_url=f"http://127.0.0.1:{mlflow_port}",
        extra_env={"AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(airflow_port),
                   # A local, single-user stack: no login page.
                   "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"})


def run_up(root: str | Path, *, configs: str | Path | None = None, airflow_port: int = 8080,
           mlflow_port: int = 5000, log: Callable[[str], None] = print,
           ready_timeout_s: float = 300,
           on_ready: Callable[[LocalStack], None] | None = None) -> LocalStack:
    """Serve Airflow (``airflow standalone``) and the MLflow UI until Ctrl-C.

    Both use the stack of :func:`up_stack`; their output goes to ``<root>/logs/``. With
    ``on_ready``, it is called once both answer and both stop when it returns (for tests and
    scripts).

    Raises:
        ConfigError: a port is taken.
        RetrainError: a server exited or did not answer within ``ready_timeout_s``.
    """
    stack = up_stack(root, configs=configs, airflow_port=airflow_port, mlflow_port=mlflow_port)
    for port in (airflow_port, mlflow_port):
        if _port_open(port):
            raise ConfigError(f"port {port} on 127.0.0.1 is already in use; stop what holds it "
                              "or choose another with --airflow-port / --mlflow-port")
    logs = stack.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"Airflow home {stack.airflow_home}; DAGs from {stack.dags_folder} for the configs in "
        f"{stack.configs_dir}; storage {stack.storage_root}")
    stack.migrate()
    commands = {
        "mlflow": [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                   stack.tracking_uri, "--artifacts-destination",
                   str(stack.root / "mlartifacts"), "--host", "127.0.0.1", "--port",
                   str(mlflow_port)],
        "airflow": [sys.executable, "-m", "airflow", "standalone"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}-up.log", "ab") as out:
                procs[name] = subprocess.Popen(command, env=stack.process_env(), stdout=out,
                                               stderr=subprocess.STDOUT, cwd=stack.root,
                                               start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        waiting = {"airflow": airflow_port, "mlflow": mlflow_port}
        while waiting:
            for name, port in list(waiting.items()):
                if procs[name].poll() is not None:
                    raise RetrainError(f"{name} exited with code {procs[name].returncode}; see "
                                       f"{logs / f'{name}-up.log'}")
                if _port_open(port):
                    log(f"{name} answers on http://127.0.0.1:{port}")
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise RetrainError(f"{', '.join(waiting)} did not answer within "
                                   f"{ready_timeout_s:.0f} s; see {logs}")
            time.sleep(1)
        log(f"Airflow UI  http://127.0.0.1:{airflow_port}  (no login: a local, single-user "
            "stack; DAGs start paused, toggle them on)")
        log(f"MLflow UI   http://127.0.0.1:{mlflow_port}")
        log(f"logs        {logs}/airflow-up.log, {logs}/mlflow-up.log; Ctrl-C stops both")
        if on_ready is not None:
            on_ready(stack)
        while on_ready is None:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RetrainError(f"{name} exited with code {proc.returncode}; see "
                                       f"{logs / f'{name}-up.log'}")
            time.sleep(2)
    finally:
        for proc in procs.values():
            _stop(proc)
    return stack
