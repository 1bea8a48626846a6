# loraplex on a CUDA machine: `docker build -t loraplex .` then
#   docker run --gpus all -p 8000:8000 -v loraplex-cache:/cache -v "$PWD/adapters:/adapters" loraplex
# Every `serve` flag can be set with LORAPLEX_<FLAG> (e.g. -e LORAPLEX_MAX_LORAS=16) or appended
# to the command line (docker run ... loraplex --max-loras 16).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.12 from the base distribution, a venv outside the source tree, curl for HEALTHCHECK.
# Distribution packages follow the base image's release (pinning them breaks on every point release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid loraplex --create-home --home-dir /home/loraplex loraplex \
    && mkdir -p /opt/loraplex /cache /adapters \
    && chown -R loraplex:loraplex /opt/loraplex /cache /adapters

WORKDIR /opt/loraplex
COPY --chown=loraplex:loraplex pyproject.toml README.md ./
COPY --chown=loraplex:loraplex server ./server
COPY --chown=loraplex:loraplex loadtest ./loadtest

# The README's GPU install: torch first (the registry's CUDA build), then the package with
# its pinned dependencies (bitsandbytes and triton use CUDA when it is there).
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip==25.3 \
    && pip install torch==2.13.0 \
    && pip install triton==3.9.0 . \
    && chown -R loraplex:loraplex /opt/venv

USER 10001:10001
ENV LORAPLEX_CACHE=/cache \
    LORAPLEX_ADAPTERS_DIR=/adapters \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000
VOLUME ["/cache", "/adapters"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["loraplex", "serve"]
