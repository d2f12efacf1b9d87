# syntax=docker/dockerfile:1
# The foveate learning worker: `foveate worker` reads fixations from Redis Streams, trains the model
# online, and serves its Prometheus metrics on :9101. See docs/deploy.md.
#
#   docker build -f docker/worker.Dockerfile -t foveate/worker .                       # GPU (default)
#   docker build -f docker/worker.Dockerfile --build-arg VARIANT=cpu -t foveate/worker:cpu .
#
# VARIANT=gpu starts from PyTorch's CUDA runtime image, whose torch satisfies pyproject's floor, so
# the install below adds only foveate and its light dependencies. VARIANT=cpu starts from the same
# slim Python as the API image and needs no GPU or NVIDIA runtime on the host.
ARG VARIANT=gpu

FROM pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime AS base-gpu

FROM python:3.11.11-slim-bookworm AS base-cpu

# DL3006: base-${VARIANT} is one of the two pinned stages above, not an image from a registry.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS worker

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FOVEATE_HOST=0.0.0.0 \
    FOVEATE_WORKER_METRICS_PORT=9101 \
    FOVEATE_CHECKPOINT_PATH=/data/checkpoints/foveate.pt

WORKDIR /app

# Only what the package needs: pyproject.toml ships exactly these packages (tests/deploy checks it).
COPY pyproject.toml ./
COPY learner/ learner/
COPY service/ service/
COPY clients/ clients/
COPY foveate/ foveate/
COPY docker/healthcheck.py /usr/local/bin/foveate-healthcheck

# The same two pip commands as scripts/setup.sh (the README's install); tests/deploy checks they match.
# DL3013 (unpinned pip packages): pip itself is upgraded as setup.sh does, and the project's
# dependencies are pyproject.toml's ranges, the same for images and checkouts.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip install --no-cache-dir -e ".[test,lsl,pupil]" \
 && groupadd --gid 10001 foveate \
 && useradd --create-home --uid 10001 --gid 10001 foveate \
 && mkdir -p /data/checkpoints /data/weights \
 && chown -R foveate:foveate /data \
 && chmod 0755 /usr/local/bin/foveate-healthcheck

# Checkpoints must outlive the container; trunk weights are mounted in read-only.
VOLUME ["/data/checkpoints", "/data/weights"]

USER 10001:10001
EXPOSE 9101

# The worker is healthy when its metrics answer and its loop beat within the last minute.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "python /usr/local/bin/foveate-healthcheck http://127.0.0.1:${FOVEATE_WORKER_METRICS_PORT}/metrics --max-heartbeat-age 60"]

ENTRYPOINT ["foveate"]
CMD ["worker"]
