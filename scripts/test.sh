#!/usr/bin/env bash
# The test suite (what CI runs): the static checks (ruff, mypy, the import contracts), then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev
scripts/deploy_tools.sh  # promtool for the static deploy checks (best effort)
echo "test.sh: ruff, mypy, import contracts" >&2
.venv/bin/ruff check --quiet .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache > /tmp/tandem-lint-imports.log 2>&1 || { cat /tmp/tandem-lint-imports.log >&2; exit 1; }
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
