#!/usr/bin/env bash
# The test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev
scripts/deploy_tools.sh  # promtool for the static deploy checks (best effort)
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
