# Local Prometheus image for hosts without a registry (scripts/compose_e2e.sh builds it): Debian
# bookworm's `prometheus` package, run like prom/prometheus (arguments from compose's `command`,
# data in /prometheus), plus wget for compose's healthcheck.
#   docker build --network host --build-arg DEBIAN_IMAGE=tandem-local/debian:bookworm \
#       -f deploy/base/prometheus.Dockerfile -t tandem-local/prometheus deploy/base
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus
# the package's system user (its uid is the package's choice, hence by name)
# hadolint ignore=DL3066
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
