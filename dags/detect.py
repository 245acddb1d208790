"""Inference DAGs: one ``detect_<type>`` per ``configs/object_types/<type>.yaml``.

Runs the current champion over the scenes dropped in ``inference/incoming/<type>/`` and stores
GeoJSON predictions under ``predictions/<type>/<model_version>/``. Scheduled (hourly by default,
$AUTORETRAIN_DETECT_SCHEDULE) and also triggered whenever ``retrain_<type>`` promotes a new
champion, through the Asset ``x-autoretrain://<type>/champion``. The stage itself is
:mod:`retrain_lib.cycle.detect`; this file only wires it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import (
    DAG,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    dag,
    get_current_context,
    get_parsing_context,
    task,
)
from airflow.sdk.exceptions import AirflowSkipException

from retrain_lib.airflow.dag_config import (
    broken_configs_dag,
    champion_asset,
    detect_schedule,
    load_dag_configs,
    retry_args,
)
from retrain_lib.airflow.tasks import run_stage
from retrain_lib.core.config import ObjectTypeConfig

START = datetime(2025, 1, 1, tzinfo=UTC)


def _doc(cfg: ObjectTypeConfig, cron: str) -> str:
    return f"""\
# Detect `{cfg.name}` ({", ".join(cfg.classes)}) with the champion

Drop GeoTIFF scenes into `inference/incoming/{cfg.name}/` in the storage root. Each run:

1. **waiting_scenes** lists them; with none waiting the run is *skipped*.
2. **serving_model** pins the current `champion` of MLflow model
   `{cfg.registered_model_name}` by version; before the first promotion the run is *skipped*.
3. **detect** (one task per scene) writes
   `predictions/{cfg.name}/<version>/<scene_id>.geojson` (scene CRS), then moves the scene to
   `inference/done/{cfg.name}/`. A re-run reuses stored predictions.

Runs on cron `{cron}` (UTC) and whenever `retrain_{cfg.name}` promotes a new champion
(Asset `x-autoretrain://{cfg.name}/champion`). Once analysts annotate a detected scene and drop
it for training, the next cycle mines these stored predictions for hard examples.
"""


def build_detect_dag(cfg: ObjectTypeConfig) -> DAG:
    """The inference DAG of one object type."""
    cron = detect_schedule()

    @dag(
        dag_id=f"detect_{cfg.name}",
        description=f"Detect {cfg.name} objects in new scenes with the champion",
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"),
                                     assets=champion_asset(cfg.name)),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True,
        tags=["autoretrain", "detect", cfg.name, *cfg.tags],
        doc_md=_doc(cfg, cron),
        default_args={"owner": cfg.owner, **retry_args()},
    )
    def detect() -> None:
        @task
        def waiting_scenes() -> list[str]:
            from retrain_lib.core.layout import inference_incoming_prefix
            from retrain_lib.cycle import detect

            scenes: list[str] = run_stage(detect.list_inference_scenes, cfg)
            if not scenes:
                raise AirflowSkipException(f"no scene waiting in "
                                           f"{inference_incoming_prefix(cfg.name)}/")
            return scenes

        @task(multiple_outputs=False)
        def serving_model() -> dict[str, Any]:
            from retrain_lib.cycle import detect

            model: dict[str, Any] | None = run_stage(detect.serving_model, cfg)
            if model is None:
                raise AirflowSkipException(f"{cfg.registered_model_name} has no champion yet; "
                                           f"retrain_{cfg.name} promotes the first one")
            return model

        @task(multiple_outputs=False, map_index_template="{{ scene_id }}")
        def detect_scene(scene_key: str, model: dict[str, Any]) -> dict[str, Any]:
            from retrain_lib.cycle import detect

            context: dict[str, Any] = get_current_context()  # type: ignore[assignment]
            context["scene_id"] = scene_key.rsplit("/", 1)[-1]  # the mapped task's label
            return run_stage(detect.detect_incoming_scene, cfg, scene_key,
                             detect.ServingModel.from_json(model))

        scenes = waiting_scenes()
        model = serving_model()
        scenes >> model
        detect_scene.partial(model=model).expand(scene_key=scenes)

    return detect()


# Workers parse this file to run one task: build only that task's DAG.
_wanted = get_parsing_context().dag_id
_configs = load_dag_configs(__file__)
for _name, _cfg in _configs.configs.items():
    if _wanted is None or _wanted == f"detect_{_name}":
        globals()[f"detect_{_name}"] = build_detect_dag(_cfg)
# A broken YAML is an import error naming its file and field; the other types keep their DAGs.
if _wanted is None and _configs.problems:
    broken_configs = broken_configs_dag(_configs.problems, "autoretrain_broken_configs_detect")
