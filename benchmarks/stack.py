"""Wall time of whole cycles on the compose stack's services: two object types at once
against one.

Each arm starts a fresh :class:`retrain_lib.devtools.service_stack.ServiceStack` (Airflow with
the CeleryExecutor and two workers, an MLflow server with a PostgreSQL backend and S3
artifacts, storage on moto's S3 server over HTTP), drops the same small scenes for each type,
unpauses the DAGs through the REST API and times from the unpause to the end of the last
retraining run. Needs PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis on 6379, as CI has.

``python benchmarks/stack.py --write-docs`` replaces the "Cycles on the service stack"
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from docs_section import write_section
from tiling import machine

REPO_ROOT = Path(__file__).resolve().parents[1]
TYPES = {"vehicle": ("car", "truck"), "aircraft": ("airplane", "helicopter")}


def run_arm(types: list[str], scenes: int, epochs: int, root: Path, endpoint: str
            ) -> dict[str, Any]:
    import yaml

    from retrain_lib.core.storage import S3Settings, open_storage
    from retrain_lib.devtools.local_stack import project_folders
    from retrain_lib.devtools.service_stack import ServiceStack
    from tests.conftest import new_bucket, postgres_database
    from tests.devtools.test_service_stack import _config, _drop, _put_folder

    dags, plugins, _ = project_folders()
    configs = root / "configs"
    configs.mkdir(parents=True)
    s3 = S3Settings(endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="bench", aws_secret_access_key="bench")
    bucket = new_bucket(s3, "bench")
    storage = open_storage(f"s3://{bucket}/data", s3=s3)
    for seed, name in enumerate(types):
        cfg = _config(name, TYPES[name])
        cfg["training"]["epochs"] = epochs
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        _drop(root / "drops" / name, TYPES[name], scenes, seed=10 * seed + 1)
        _put_folder(storage, root / "drops" / name, f"incoming/{name}/first-drop")
    with postgres_database("bench_airflow") as airflow_db, \
            postgres_database("bench_mlflow") as mlflow_db:
        stack = ServiceStack(
            root=root / "stack", airflow_db_url=airflow_db, mlflow_backend_uri=mlflow_db,
            redis_url=f"redis://127.0.0.1:6379/{1 + uuid.uuid4().int % 15}",
            storage_uri=storage.uri, s3=s3, mlflow_artifacts=f"s3://{bucket}/mlflow",
            configs_dir=configs, dags_folder=dags, plugins_folder=plugins,
            pools={"training": 1},
            extra_env={"AIRFLOW__CELERY__OPERATION_TIMEOUT": "10", "YOLO_OFFLINE": "1",
                       "YOLO_CONFIG_DIR": str(root / "yolo"), "MPLBACKEND": "Agg"},
            log=lambda m: print(m, file=sys.stderr))
        with stack:
            dag_ids = {f"retrain_{t}" for t in types}
            stack.wait_for_dags(dag_ids)
            started = time.monotonic()
            for dag_id in sorted(dag_ids):
                stack.unpause(dag_id)
            runs = {dag_id: stack.wait_for_run(dag_id, timeout_s=3600) for dag_id in dag_ids}
            wall = time.monotonic() - started
    return {"types": types, "wall_s": wall, "states": {k: r["state"] for k, r in runs.items()}}


def render(results: list[dict[str, Any]], scenes: int, epochs: int, command: str) -> str:
    one = next(r for r in results if len(r["types"]) == 1)
    rows = [f"| {', '.join(r['types'])} | {r['wall_s']:.0f} | "
            f"{r['wall_s'] / one['wall_s']:.2f}x | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(r['states'].items()))} |"
            for r in results]
    return f"""<!-- stack:begin -->
## Cycles on the service stack

The compose stack's services as processes on one machine (`retrain_lib/devtools/
service_stack.py`): Airflow's api-server, scheduler, dag-processor and triggerer with the
CeleryExecutor, a worker for `default` and one for `default,train` (concurrency 4 each), an
Airflow pool of 1 training slot, an MLflow server (PostgreSQL, S3 artifacts), storage on
moto's S3 server over HTTP. Each type drops {scenes} scenes of 256 px; one candidate trains
{epochs} epoch(s) at 64 px. Time from unpausing the DAGs to the end of the last run.

Machine: {machine()}; load average {os.getloadavg()[0]:.1f} when the run ended.

| types | wall (s) | vs one type | runs |
|---|---:|---:|---|
{chr(10).join(rows)}

On 2 cores every task is a new Python process that imports its stage, so the two types'
tasks compete for the same cores; the pool keeps their trainings one at a time.

Reproduce: `{command}`
<!-- stack:end -->
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=3, help="Scenes per type.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs per training.")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import subprocess

    from tests.conftest import free_port, wait_for_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    results = []
    try:
        wait_for_port(port)
        for types in (["vehicle"], ["vehicle", "aircraft"]):
            with tempfile.TemporaryDirectory(prefix="autoretrain-stack-bench-") as tmp:
                result = run_arm(types, args.scenes, args.epochs, Path(tmp),
                                 f"http://127.0.0.1:{port}")
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        server.terminate()
        server.wait()
    command = "python benchmarks/stack.py " + " ".join(a for a in sys.argv[1:]
                                                       if a != "--write-docs")
    section = render(results, args.scenes, args.epochs, command)
    print(section)
    if args.write_docs:
        write_section(section, "stack")


if __name__ == "__main__":
    main()
