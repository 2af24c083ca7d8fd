#!/usr/bin/env bash
# The test suite (what CI runs): the static checks (ruff, mypy, the import contracts), then pytest
# on 2 workers (pytest-xdist: most tests wait on service processes; the machines here have 2 cores).
#
#   scripts/test.sh [PYTEST_ARGS]           the full suite: every test but the true-size ones (-m truesize,
#                                           ~12 min each on a CPU) and the CUDA ones (-m cuda), which need
#                                           their own hosts (scripts/gpu_check.sh runs the CUDA ones)
#   scripts/test.sh --quick [PYTEST_ARGS]   the inner loop: ruff and the import contracts (no mypy), then the
#                                           suite without the tests marked slow (10 s or more each on 2 idle
#                                           cores: the multi-service integration tests, the GPU check's dry run;
#                                           the full suite and CI run them)
#
# PYTEST_ARGS go to pytest after these (a file, -k EXPR, -x, -m EXPR, -n 0 for one process ...).
# TANDEM_TEST_WORKERS: pytest-xdist workers (default 2; 0: one process, no xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then
  quick=1
  shift
fi
scripts/bootstrap.sh dev
scripts/deploy_tools.sh  # promtool for the static deploy checks (best effort)
.venv/bin/ruff check --quiet .
if [ "$quick" = 0 ]; then
  echo "test.sh: ruff, mypy, import contracts" >&2
  .venv/bin/mypy
else
  echo "test.sh --quick: ruff, import contracts; pytest -m 'not slow'" >&2
fi
contracts="$(mktemp)"
trap 'rm -f "$contracts"' EXIT
.venv/bin/lint-imports --no-cache > "$contracts" 2>&1 || { cat "$contracts" >&2; exit 1; }
export HF_HUB_OFFLINE=1
workers="${TANDEM_TEST_WORKERS:-2}"
args=()
if [ "$workers" != 0 ]; then
  # loadscope, as tests/conftest.py defines the unit: a whole file where it has a module-scoped fixture
  # (set up once, on one worker), else one test; units with a slow test first (no reorder by xdist)
  args+=(-n "$workers" --dist loadscope --no-loadscope-reorder)
fi
if [ "$quick" = 1 ]; then
  args+=(-m "not slow and not truesize and not cuda")
fi
.venv/bin/python -m pytest -q "${args[@]}" "$@"
