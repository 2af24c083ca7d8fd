#!/usr/bin/env bash
# The main job, offline on the embedded demo pack: scheduler, edge server and device service come
# up on loopback (python -m services.cli.topology), one image goes through the split pipeline (the
# scheduler plans T, k and the codec; the edge runs the first k steps, the device the rest), then
# everything stops. Logs in out/logs/.
#   scripts/demo.sh                                   the demo prompt → out/demo.png
#   scripts/demo.sh "a green square at the top on a black background" --user bob --out out/bob.png
# A first argument that is not a flag is the prompt; the other arguments go to `tandem generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="a red circle at the left on a blue background"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  prompt=$1
  shift
fi
scripts/bootstrap.sh all
mkdir -p out
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m services.cli.topology --free-ports --log-dir out/logs \
    --then generate "$prompt" --out out/demo.png \
    --device-class cpu-demo "$@"  # the device class profiled on a CPU (services/scheduler/profiles)
