"""Retraining DAGs: one ``retrain_<type>`` per ``configs/object_types/<type>.yaml``.

Each task is one call of a stage of :mod:`retrain_lib.cycle` (a plain, idempotent function
with a typed result) through :func:`~retrain_lib.airflow.tasks.run_stage` (``run_cycle_stage``
also renews the cycle's lock); this file only wires
them. Module-level imports are ``airflow.sdk``, the standard library and retrain_lib's light
modules (config models, :mod:`retrain_lib.airflow`): no torch, ultralytics, mlflow or rasterio,
so parsing stays fast. The config folder is
$AUTORETRAIN_CONFIGS, else ``configs/object_types`` beside this folder.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, Param, dag, get_current_context, get_parsing_context, task
from airflow.sdk.exceptions import AirflowSkipException

from retrain_lib.airflow.dag_config import (
    broken_configs_dag,
    champion_asset,
    load_dag_configs,
    retry_args,
)
from retrain_lib.airflow.links import mlflow_task, publish_mlflow_link
from retrain_lib.airflow.tasks import (
    current_cycle_id,
    hold_current_cycle,
    record_check_time,
    release_current_cycle,
    run_cycle_stage,
    run_stage,
)
from retrain_lib.core.config import ObjectTypeConfig

START = datetime(2025, 1, 1, tzinfo=UTC)


def _doc(cfg: ObjectTypeConfig) -> str:
    policy = cfg.trigger
    days = (f"or after {policy.max_days_without_training} days without training"
            if policy.max_days_without_training else "(never forced by time)")
    candidates = ", ".join(f"`{c.name}`" for c in cfg.training.candidates)
    return f"""\
# Retrain `{cfg.name}` ({", ".join(cfg.classes)})

{cfg.description}

Runs **{cfg.schedule or "only when triggered"}** (UTC). Each run is one retraining cycle:

1. **check_new_data**: retrains when at least {policy.min_new_annotations} new annotated objects
   arrived since the last training {days}. Otherwise the run stops here: every task is
   *skipped* (not failed), and the log line and `cycles/{cfg.name}/<run>/report.md` say why.
2. **ingest**: validates each drop in `incoming/{cfg.name}/`. Good drops go to the catalog, bad
   ones to `quarantine/{cfg.name}/<drop>/` with a `reason.json` naming every problem.
3. **tile** (one task per scene) → **mine** the champion's mistakes on the new scenes →
   **assemble** a content-hashed dataset version with a frozen test set of whole scenes.
4. **train** one task per candidate ({candidates}) with the `{cfg.runner.kind}` runner,
   warm-started from the champion. The *MLflow* button of a train task opens its run.
5. **evaluate** every candidate *and* the champion on the same frozen test scenes.
6. **register_and_promote**: every candidate becomes a version of MLflow model
   `{cfg.registered_model_name}`; the `champion` alias moves only when the gate passes
   ({cfg.promotion.primary_metric} +{cfg.promotion.min_improvement}, guards hold). Its *MLflow*
   button opens the model version.
7. **report** writes `cycles/{cfg.name}/<run>/report.json` and `report.md`;
   **publish_champion** updates Asset `x-autoretrain://{cfg.name}/champion` when a new
   champion was promoted, which re-runs `detect_{cfg.name}`.

**Operating it.** Toggle the DAG on to let it run on schedule. *Trigger with config* to force a
cycle (`force`), shorten training (`epochs`) or train only some candidates (`candidates`).
Re-running or clearing a run is safe: every stage finds and reuses its earlier work.
A failed task whose log says `ConfigError` or `InputError` needs a fix first (config, data);
storage and training failures retry by themselves with backoff.
Roll back a bad champion with `autoretrain rollback {cfg.name} --to <version> --reason ...`.
"""


def build_retrain_dag(cfg: ObjectTypeConfig) -> DAG:
    """The retraining DAG of one object type."""
    champion = champion_asset(cfg.name)
    names = [c.name for c in cfg.training.candidates]
    # Trainings go to the workers of their queue, and an Airflow pool bounds how many run.
    placement = {k: v for k, v in (("queue", cfg.runner.queue), ("pool", cfg.runner.pool)) if v}

    @dag(
        dag_id=f"retrain_{cfg.name}",
        description=f"Retrain the {cfg.name} detector when new annotations arrive",
        schedule=cfg.schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True,
        tags=["autoretrain", "retrain", cfg.name, *cfg.tags],
        doc_md=_doc(cfg),
        default_args={"owner": cfg.owner, **retry_args()},
        params={
            "force": Param(False, type="boolean",
                           description="Retrain even if the trigger policy says no."),
            "epochs": Param(None, type=["null", "integer"], minimum=1,
                            description="Epochs per candidate for this run (empty: config)."),
            "candidates": Param([], type="array", items={"type": "string", "enum": names},
                                description="Candidates to train (empty: all)."),
        },
    )
    def retrain() -> None:
        @task(multiple_outputs=False)
        def check_new_data() -> dict[str, Any]:
            from retrain_lib.cycle import report, trigger
            from retrain_lib.cycle.results import TriggerDecision

            context = get_current_context()
            started_at = datetime.now(UTC)
            started = started_at.isoformat(timespec="seconds")
            check = run_stage(trigger.check_new_data, cfg, force=context["params"]["force"],
                              started_at=started)
            if not check["retrain"]:
                # A re-run of a finished cycle skips too, but keeps that cycle's report.
                run_stage(report.record_skip, cfg, current_cycle_id(context),
                          TriggerDecision.from_json(check))
                raise AirflowSkipException(f"no retraining this time: {check['reason']}")
            hold_current_cycle(cfg)  # another cycle of this type running: retried, so it waits
            record_check_time(cfg, started_at)
            return check

        @task(multiple_outputs=False)
        def ingest() -> dict[str, Any]:
            from retrain_lib.cycle import data

            return run_cycle_stage(data.ingest, cfg, current_cycle_id(), timed="ingest")

        @task
        def list_scenes() -> list[str]:
            from retrain_lib.cycle import data

            return run_cycle_stage(data.scenes_to_tile, cfg)

        @task(multiple_outputs=False, map_index_template="{{ scene_id }}")
        def tile(scene_id: str) -> dict[str, Any]:
            from retrain_lib.cycle import data

            context: dict[str, Any] = get_current_context()  # type: ignore[assignment]
            context["scene_id"] = scene_id  # the mapped task's label in the UI
            return run_cycle_stage(data.tile_one, cfg, scene_id, timed="tile", part=scene_id)

        @task(multiple_outputs=False)
        def mine() -> dict[str, Any]:
            from retrain_lib.cycle import mining

            return run_cycle_stage(mining.mine, cfg, current_cycle_id(), timed="mine")

        @task(multiple_outputs=False)
        def assemble() -> dict[str, Any]:
            from retrain_lib.cycle import data

            return run_cycle_stage(data.assemble, cfg, current_cycle_id(), timed="assemble")

        @task
        def select_candidates() -> list[str]:
            chosen = list(get_current_context()["params"]["candidates"] or names)
            unknown = sorted(set(chosen) - set(names))
            if unknown:
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(f"params.candidates: unknown {unknown}; configured: "
                                           f"{names}")
            return chosen

        @mlflow_task(map_index_template="{{ candidate }}", **retry_args(delay_s=300),
                     **placement)
        def train(candidate: str, dataset: dict[str, Any]) -> dict[str, Any]:
            from retrain_lib.airflow.links import mlflow_run_page
            from retrain_lib.cycle import models
            from retrain_lib.cycle.results import AssembledDataset

            context: dict[str, Any] = get_current_context()  # type: ignore[assignment]
            context["candidate"] = candidate  # the mapped task's label in the UI
            launch_pod = None
            if cfg.runner.kind == "kubernetes":
                from retrain_lib.airflow.kubernetes import pod_launcher

                launch_pod = pod_launcher(cfg.runner.kubernetes, context)
            result = run_cycle_stage(models.train_candidate, cfg, current_cycle_id(context),
                               AssembledDataset.from_json(dataset), candidate,
                               epochs=context["params"]["epochs"], launch_pod=launch_pod,
                               timed="train", part=candidate)
            publish_mlflow_link(mlflow_run_page(result["mlflow_run_id"]), context)
            return result

        @task(multiple_outputs=False)
        def evaluate(dataset: dict[str, Any], trained: list[dict[str, Any]]) -> dict[str, Any]:
            from retrain_lib.cycle import models
            from retrain_lib.cycle.results import AssembledDataset, TrainedCandidate

            return run_cycle_stage(models.evaluate_models, cfg, AssembledDataset.from_json(dataset),
                             [TrainedCandidate.from_json(t) for t in trained],
                             cycle_id=current_cycle_id(), timed="evaluate")

        @mlflow_task
        def register_and_promote(dataset: dict[str, Any], trained: list[dict[str, Any]],
                                 evaluation: dict[str, Any]) -> dict[str, Any]:
            from retrain_lib.airflow.links import mlflow_model_page
            from retrain_lib.cycle import models
            from retrain_lib.cycle.results import AssembledDataset, Evaluation, TrainedCandidate

            result = run_cycle_stage(models.register_and_promote, cfg, current_cycle_id(),
                               AssembledDataset.from_json(dataset),
                               [TrainedCandidate.from_json(t) for t in trained],
                               Evaluation.from_json(evaluation), timed="register")
            publish_mlflow_link(mlflow_model_page(
                cfg.registered_model_name,
                result.get("promoted_version") or result.get("champion_version")))
            return result

        @task(multiple_outputs=False)
        def report(check: dict[str, Any], ingested: dict[str, Any],
                   tiles: list[dict[str, Any]], mined: dict[str, Any],
                   dataset: dict[str, Any], trained: list[dict[str, Any]],
                   evaluation: dict[str, Any], promotion: dict[str, Any]) -> dict[str, Any]:
            from retrain_lib.cycle import report
            from retrain_lib.cycle.results import CycleStages

            stages = CycleStages.from_json({
                "check": check, "ingest": ingested, "tiles": list(tiles), "mine": mined,
                "dataset": dataset, "trained": list(trained), "evaluation": evaluation,
                "promotion": promotion})
            return run_cycle_stage(report.write_report, cfg, current_cycle_id(), stages)

        # The asset is an inlet too, so the task can read its past events: a rerun announces
        # a promotion that an earlier, stopped run of the cycle made but never announced.
        @task(multiple_outputs=False, inlets=[champion], outlets=[champion])
        def publish_champion(written: dict[str, Any]) -> dict[str, Any]:
            version = written.get("promoted_version")
            if not version:
                raise AirflowSkipException("no new champion this cycle: nothing to announce")
            context = get_current_context()
            if any((event.extra or {}).get("version") == str(version)
                   for event in context["inlet_events"][champion]):
                raise AirflowSkipException(f"v{version} was announced by an earlier run of "
                                           "this cycle")
            from retrain_lib.cycle.champion import version_uri

            event = {"model": cfg.registered_model_name, "version": str(version),
                     "model_uri": version_uri(cfg, str(version)), "report": written["report"]}
            context["outlet_events"][champion].extra = event
            return event

        @task
        def release_cycle() -> None:
            release_current_cycle(cfg)

        checked = check_new_data()
        ingested = ingest()
        scenes = list_scenes()
        tiles = tile.expand(scene_id=scenes)
        mined = mine()
        dataset = assemble()
        chosen = select_candidates()
        trained = train.partial(dataset=dataset).expand(candidate=chosen)
        evaluation = evaluate(dataset, trained)
        promotion = register_and_promote(dataset, trained, evaluation)
        written = report(checked, ingested, tiles, mined, dataset, trained, evaluation,
                         promotion)
        checked >> [ingested, chosen]
        ingested >> scenes
        tiles >> mined >> dataset
        # Gives the cycle's lock back however the run ends; a teardown, so the run's own state
        # is still that of its stages.
        publish_champion(written) >> release_cycle().as_teardown(setups=checked)

    return retrain()


# Workers parse this file to run one task: build only that task's DAG.
_wanted = get_parsing_context().dag_id
_configs = load_dag_configs(__file__)
for _name, _cfg in _configs.configs.items():
    if _wanted is None or _wanted == f"retrain_{_name}":
        globals()[f"retrain_{_name}"] = build_retrain_dag(_cfg)
# A broken YAML is an import error naming its file and field; the other types keep their DAGs.
if _wanted is None and _configs.problems:
    broken_configs = broken_configs_dag(_configs.problems, "autoretrain_broken_configs_retrain")
