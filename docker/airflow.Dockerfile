# The Airflow image of docker-compose.yml: Airflow 3 with retrain_lib installed. Every Airflow
# service (api-server, scheduler, dag-processor, triggerer, Celery worker) runs it; the DAG files,
# plugins and configs are mounted from the checkout, so editing them needs no rebuild.
#
#   docker compose build            # or:
#   docker build -f docker/airflow.Dockerfile -t autoretrain-airflow:latest .
#
# Tasks run stages in-process (ingest, tiling, mining, evaluation, detection, and training with
# the local runner), so the image has torch; the CPU build keeps it small. GPU training runs in
# the trainer image (docker/trainer.Dockerfile) through the Docker runner.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER 0
# OpenCV (used by Ultralytics) loads these shared libraries at import time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /scratch && chown 50000:0 /scratch

USER 50000
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    AUTORETRAIN_SCRATCH=/scratch \
    AUTORETRAIN_CONFIGS=/opt/autoretrain/configs/object_types

WORKDIR /opt/autoretrain
# Same pins as the project (constraints.txt, which pins apache-airflow to this image's version);
# the 'celery' extra adds the Celery provider for the scale-out profile.
COPY --chown=50000:0 constraints.txt pyproject.toml README.md ./
COPY --chown=50000:0 retrain_lib ./retrain_lib
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt ".[celery]" \
    && python -c "import retrain_lib.airflow.tasks, retrain_lib.cycle.run"
COPY --chown=50000:0 configs ./configs

WORKDIR /opt/airflow
