#!/usr/bin/env bash
# The docker-compose topology without Docker: edge server, device service and (when present) the
# scheduler on loopback with the demo pack; logs in out/logs/. Ctrl-C stops everything.
# Arguments go to `python -m services.cli.topology` (e.g. --no-scheduler, --free-ports, --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh all
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m services.cli.topology "$@"
