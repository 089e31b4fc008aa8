# transferops: the same install as the README (`make setup`), then `transferops run`.
#
#   docker build -t transferops .
#   docker run --rm -v "$PWD/work:/app/work" transferops            # CPU
#   docker run --rm --gpus all transferops                         # GPU host (NVIDIA toolkit)
#
# The pinned torch 2.14.1 wheel is a CUDA build that also runs on the CPU, so one image
# serves both. BASE swaps the base image (e.g. a CUDA image that has Python 3.11), with the
# install unchanged: docker build --build-arg BASE=<image with python3.11 + make> .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    TRANSFEROPS_PROGRESS=0 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (cached layer), then the rest of the project.
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY src ./src
RUN make setup PY=python3.11
COPY . .
ENV PATH=/app/.venv/bin:$PATH

# Runs as an unprivileged user; outputs (data/, models/, reports/, mlflow.db) go under /app.
RUN useradd --create-home transferops && chown -R transferops /app
USER transferops
CMD ["transferops", "run"]
