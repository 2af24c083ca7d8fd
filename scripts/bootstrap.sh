#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs Tandem with the extras named in $1 (default: all).
# torch is installed first, pinned to the CPU wheel our machines carry (TANDEM_TORCH overrides it,
# e.g. TANDEM_TORCH="torch==2.5.1" on a CUDA host), so a CPU machine never downloads a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

# pip, quiet, without the "WARNING: Location ..." lines a machine's pip configuration can add
# (they are about that configuration, not about Tandem); pip's own exit status is kept.
pip_quiet() {
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
}

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$python" --version)" >&2
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing ${TANDEM_TORCH:-torch==2.13.0} (the first run: a few minutes)" >&2
  pip_quiet "${TANDEM_TORCH:-torch==2.13.0}"
fi
stamp=".venv/.tandem-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing tandem[$extras]" >&2
  pip_quiet -e ".[$extras]"
  .venv/bin/python -c "import tandem, diffusers" >/dev/null
  touch "$stamp"
fi
