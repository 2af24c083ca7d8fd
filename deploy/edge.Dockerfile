# Edge server image: CUDA torch from the base image, the project with the `edge` extra, the demo
# pack inside as the default. Another pack: mount it and set TANDEM_EDGE_PACK (see README).
#   docker build -f deploy/edge.Dockerfile -t tandem-edge .
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tandem ./tandem
COPY services ./services
# torch (CUDA) comes with the base image and satisfies the project's torch range: pip keeps it.
# The project itself: its dependency ranges live in pyproject.toml (DL3013 is about pins).
# hadolint ignore=DL3013
RUN python -m pip install ".[edge]" \
    && useradd --create-home --uid 10001 --user-group tandem

ENV TANDEM_EDGE_HOST=0.0.0.0 \
    TANDEM_EDGE_PORT=50051 \
    TANDEM_EDGE_METRICS_PORT=9101 \
    TANDEM_EDGE_PACK=/app/tandem/demo_pack/large

USER 10001:10001
EXPOSE 50051 9101
# SERVING only once the model is loaded; a big pack from a volume takes a while.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "python -m tandem.healthcheck 127.0.0.1:${TANDEM_EDGE_PORT} tandem.v1.EdgeService"]
ENTRYPOINT ["python", "-m", "services.edge_server"]
