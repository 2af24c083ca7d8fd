# Local Python 3.11 base for hosts without a registry (scripts/compose_e2e.sh builds it): Debian
# bookworm's python3 (3.11, as python:3.11-slim) on a root filesystem imported with `docker import`.
# pip may install here: the image is a build base, so Debian's EXTERNALLY-MANAGED marker goes.
#   docker build --network host --build-arg DEBIAN_IMAGE=tandem-local/debian:bookworm \
#       -f deploy/base/python.Dockerfile -t tandem-local/python:3.11 deploy/base
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
CMD ["python3"]
