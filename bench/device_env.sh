#!/usr/bin/env bash
# A virtualenv with the device's dependencies only (the `ue` extra, as deploy/ue.Dockerfile
# installs them), pinned to the versions in .venv, for bench/peer_diffusers.py --device-python:
# the dev .venv carries every extra, and the device's libraries import some of them (scipy) just
# because they are installed.
#   bench/device_env.sh [DIR]    # default /tmp/tandem-device-env; prints DIR/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-/tmp/tandem-device-env}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
torch="$(.venv/bin/pip freeze --disable-pip-version-check | grep '^torch==')"  # e.g. torch==2.13.0+cpu
.venv/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -v '^torch==' > "$pins"
[ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
pip_quiet() {
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
}
# the CPU wheel from wheelhouse/ where it is there (as scripts/bootstrap.sh), else from the index
wheel="$(ls wheelhouse/torch-"${torch#torch==}"-*.whl 2>/dev/null | head -1 || true)"
pip_quiet "${wheel:-${torch%%+*}}"
pip_quiet -c "$pins" ".[ue]"
"$dir/bin/pip" uninstall --quiet -y tandem  # the bench runs the checkout's own code
echo "$dir/bin/python"
