# Scheduler service image: CPU torch only (the policy's actor; never a CUDA build), the project
# with the `scheduler` extra.
#   docker build -f deploy/scheduler.Dockerfile -t tandem-scheduler .
# Air-gapped (docs/deploy.md "Building without a registry"): --build-arg BASE_IMAGE=<local Python 3.11
# base> --build-arg TORCH_SOURCE=wheelhouse [--build-arg EXTRA_CA_CERT="$(cat proxy-ca.pem)"].
ARG BASE_IMAGE=python:3.11-slim
# torch: an index URL, or wheelhouse. Declared before FROM so that the build stages of the three
# images are the same instructions up to the torch layer, which they then share.
ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu
ARG EXTRA_CA_CERT=""
# the index pip installs from (empty: pip's default); build stage only
ARG PIP_INDEX=""

# Build stage: torch and the project's dependencies into /opt/venv. The extra CA and the
# wheelhouse live here only; the final stage copies the virtualenv alone, then the sources.
FROM ${BASE_IMAGE} AS build
ARG TORCH_SOURCE
ARG EXTRA_CA_CERT
ARG PIP_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/pip_install.sh /build/
COPY wheelhouse/ /build/wheelhouse/
RUN sh /build/pip_install.sh torch
COPY pyproject.toml /src/
RUN sh /build/pip_install.sh deps scheduler

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
# /var/lib/tandem: the --state-file volume (docker-compose.yml), the service user's own (a new
# named volume takes the ownership of the directory it mounts over)
RUN useradd --create-home --uid 10001 --user-group tandem \
    && install -d -o 10001 -g 10001 /var/lib/tandem
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY tandem ./tandem
COPY services ./services

ENV TANDEM_SCHEDULER_HOST=0.0.0.0 \
    TANDEM_SCHEDULER_PORT=50071 \
    TANDEM_SCHEDULER_METRICS_PORT=9103

USER 10001:10001
EXPOSE 50071 9103
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "python -m services.cli.healthcheck 127.0.0.1:${TANDEM_SCHEDULER_PORT}"]
ENTRYPOINT ["python", "-m", "services.scheduler"]
