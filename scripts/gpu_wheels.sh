#!/usr/bin/env bash
# The wheels the GPU host lacks, for scripts/gpu_check.sh (issue 26, part 4). Run it on a machine
# with network, from the repository:
#
#   scripts/gpu_wheels.sh [--dir DIR] [--print]
#
# The GPU host has PyTorch with CUDA, transformers, accelerate, peft, grpcio, prometheus-client,
# huggingface-hub, safetensors, numpy, regex, requests, filelock and Pillow, but no network and no
# diffusers. This downloads into DIR (default gpu_wheels/, ignored by git: carry it to the host)
# diffusers and what its metadata requires that the host does not hold: importlib_metadata (and
# lazy-importer, which that requires). Each is pinned to the version in .venv (PYTHON=... reads
# another environment), for CPython 3.12 (GPU_PYTHON_VERSION) on x86-64 Linux, without
# dependencies. The index is pip's own configuration (pip config, PIP_INDEX_URL): none is named
# here. Wheels already in DIR are removed first (two versions of one package stop the install).
# --print: print the pip commands, download nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(diffusers importlib_metadata lazy-importer)
MAX_MIB=32  # what travels with the checkout to the host: 64 MiB in all
DIR=gpu_wheels
PRINT=0
while [ $# -gt 0 ]; do
    case "$1" in
        --print) PRINT=1 ;;
        --dir) [ $# -ge 2 ] || { echo "gpu_wheels: error: --dir needs a folder" >&2; exit 2; }; DIR=$2; shift ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels: error: unknown argument $1 (usage: scripts/gpu_wheels.sh [--dir DIR] [--print])" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# NAME==VERSION of each package as installed in $PY's environment, or one line naming the missing one
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        sys.exit(f"gpu_wheels: error: {name} is not installed in {sys.prefix}: install it there, or set PYTHON")
EOF
)
[ "${#PINS[@]}" -eq "${#PACKAGES[@]}" ] || exit 1

PIP=("$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}"
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform any -d "$DIR")
if [ "$PRINT" = 1 ]; then
    for pin in "${PINS[@]}"; do
        printf '%q ' "${PIP[@]}" "$pin"
        echo
    done
    exit 0
fi

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
for pin in "${PINS[@]}"; do
    echo "gpu_wheels: $pin" >&2
    "${PIP[@]}" --quiet "$pin"
done
bytes=$(cat "$DIR"/*.whl | wc -c)
ls -l "$DIR"/*.whl >&2
if [ "$bytes" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    echo "gpu_wheels: error: the wheels in $DIR take $((bytes / 1024 / 1024)) MiB, over $MAX_MIB MiB" >&2
    exit 1
fi
echo "gpu_wheels: $((bytes / 1024)) KiB in $DIR: carry it to the GPU host (scripts/gpu_check.sh installs from it)" >&2
