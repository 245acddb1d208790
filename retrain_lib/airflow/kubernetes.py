"""The kubernetes runner's launcher: a KubernetesPodOperator run inside the ``train`` task.

The pod is the manifest of :func:`retrain_lib.training.runners.kubernetes.pod_manifest`,
given to the operator as its pod template. The operator starts the pod on the cluster of its
Airflow connection, streams the log into the task log, reads the result the entrypoint wrote
to ``/airflow/xcom/return.json`` (``do_xcom_push``), and deletes the pod. A killed task stops
the pod too (the operator's ``on_kill``). Imported only inside the task: the DAG files never
import the provider while they are parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from retrain_lib.core.config import KubernetesRunnerConfig
from retrain_lib.core.errors import ConfigError, TrainingFailed
from retrain_lib.training.runners.kubernetes import CONTAINER_NAME, PodLauncher

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

__all__ = ["pod_launcher", "pod_operator"]


def pod_operator(config: KubernetesRunnerConfig, manifest: Mapping[str, Any], *,
                 task_id: str = "train_pod") -> KubernetesPodOperator:
    """The operator that runs ``manifest`` (not bound to a DAG: it runs inside a task).

    Raises:
        ConfigError: the cncf.kubernetes provider is not installed.
    """
    try:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    except ImportError:
        raise ConfigError("runner.kind kubernetes needs the cncf.kubernetes provider: "
                          "pip install 'autoretrain[kubernetes]' (Airflow's official image "
                          "has it)") from None
    return KubernetesPodOperator(
        task_id=task_id, pod_template_dict=dict(manifest),
        name=manifest["metadata"]["name"], namespace=config.namespace,
        kubernetes_conn_id=config.kubernetes_conn_id, base_container_name=CONTAINER_NAME,
        labels=dict(manifest["metadata"]["labels"]), get_logs=True, do_xcom_push=True,
        on_finish_action="delete_pod", startup_timeout_seconds=config.startup_timeout_s,
        random_name_suffix=True)


def pod_launcher(config: KubernetesRunnerConfig, context: Mapping[str, Any]) -> PodLauncher:
    """A launcher for :func:`~retrain_lib.training.runners.run_training` that runs each pod
    through a KubernetesPodOperator in the running task's ``context``."""

    def launch(manifest: dict[str, Any]) -> Mapping[str, Any]:
        operator = pod_operator(config, manifest)
        result = operator.execute(context)  # type: ignore[arg-type]
        if not isinstance(result, Mapping):
            raise TrainingFailed(f"pod {manifest['metadata']['name']} ended without writing "
                                 "its result to /airflow/xcom/return.json; see the task log")
        return result

    return launch
