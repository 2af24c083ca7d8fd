# Device (UE) service image: CPU torch only (never a CUDA build), the project with the `ue` extra,
# the demo pack inside as the default. Another pack: mount it and set TANDEM_UE_PACK (see README).
#   docker build -f deploy/ue.Dockerfile -t tandem-ue .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

RUN python -m pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY tandem ./tandem
COPY services ./services
# The project itself: its dependency ranges live in pyproject.toml (DL3013 is about pins).
# hadolint ignore=DL3013
RUN python -m pip install ".[ue]" \
    && useradd --create-home --uid 10001 --user-group tandem

ENV TANDEM_UE_HOST=0.0.0.0 \
    TANDEM_UE_PORT=50061 \
    TANDEM_UE_METRICS_PORT=9102 \
    TANDEM_UE_PACK=/app/tandem/demo_pack/small \
    TANDEM_UE_DEVICE=cpu

USER 10001:10001
EXPOSE 50061 9102
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "python -m tandem.healthcheck 127.0.0.1:${TANDEM_UE_PORT} tandem.v1.DeviceService"]
ENTRYPOINT ["python", "-m", "services.ue_client"]
