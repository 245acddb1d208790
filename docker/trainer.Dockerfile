# The trainer image: runs the training entrypoint `python -m retrain_lib.training` (docs/training.md).
#
#   docker build -f docker/trainer.Dockerfile -t autoretrain-trainer:latest \
#       --build-arg GIT_SHA="$(git rev-parse HEAD)" .
#
# BASE_IMAGE is a CUDA PyTorch image. Pick the tag whose torch matches the torch pin in
# constraints.txt; otherwise pip replaces the base image's torch with the pinned one (it works,
# the image just gets bigger). The same image runs on CPU hosts.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG GIT_SHA=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    AUTORETRAIN_SCRATCH=/scratch \
    AUTORETRAIN_GIT_SHA=${GIT_SHA}

# OpenCV (used by Ultralytics) loads these shared libraries at import time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/autoretrain

# The training side only: no Airflow in this image. Same pins as the project (constraints.txt).
COPY constraints.txt ./
RUN python -m pip install -c constraints.txt \
        torch torchvision ultralytics mlflow boto3 pydantic pyyaml croniter typer rich numpy

COPY pyproject.toml README.md ./
COPY retrain_lib ./retrain_lib
RUN python -m pip install --no-deps . \
    && python -c "import retrain_lib.training.entrypoint, ultralytics, mlflow, boto3"

# Scratch (resumption checkpoints) lives on a volume mounted here; a new named volume takes
# this folder's owner, so the non-root user can write to it.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin trainer \
    && mkdir -p /scratch \
    && chown trainer:trainer /scratch
USER 1000:1000
WORKDIR /home/trainer

ENTRYPOINT ["python", "-m", "retrain_lib.training"]
CMD ["--help"]
