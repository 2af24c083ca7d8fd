# Scheduler service image: CPU torch only (the policy's actor; never a CUDA build), the project
# with the `scheduler` extra.
#   docker build -f deploy/scheduler.Dockerfile -t tandem-scheduler .
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
RUN python -m pip install ".[scheduler]" \
    && useradd --create-home --uid 10001 --user-group tandem

ENV TANDEM_SCHEDULER_HOST=0.0.0.0 \
    TANDEM_SCHEDULER_PORT=50071 \
    TANDEM_SCHEDULER_METRICS_PORT=9103

USER 10001:10001
EXPOSE 50071 9103
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "python -m tandem.healthcheck 127.0.0.1:${TANDEM_SCHEDULER_PORT}"]
ENTRYPOINT ["python", "-m", "services.scheduler"]
