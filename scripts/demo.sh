#!/usr/bin/env bash
# The main job: one image through the split pipeline on the embedded demo pack, offline.
# Extra arguments go to `tandem generate` (e.g. --user bob --split 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh all
mkdir -p out
export HF_HUB_OFFLINE=1
.venv/bin/tandem generate "a red circle at the left on a blue background" --out out/demo.png "$@"
