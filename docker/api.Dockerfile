# syntax=docker/dockerfile:1
# The foveate HTTP API: `foveate api` validates fixations, queues them on Redis Streams for the
# worker, waits for results, and serves /healthz, /readyz and /metrics on :8000. See docs/deploy.md.
#
#   docker build -f docker/api.Dockerfile -t foveate/api .
#
# The API process never imports torch, but the package depends on it, so the image carries it: one
# dependency set for every image and for `bash scripts/setup.sh` outweighs a smaller API image.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FOVEATE_HOST=0.0.0.0 \
    FOVEATE_PORT=8000

WORKDIR /app

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
 && chmod 0755 /usr/local/bin/foveate-healthcheck

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "python /usr/local/bin/foveate-healthcheck http://127.0.0.1:${FOVEATE_PORT}/healthz"]

ENTRYPOINT ["foveate"]
CMD ["api"]
