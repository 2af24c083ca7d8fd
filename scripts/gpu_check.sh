#!/usr/bin/env bash
# One prepared GPU run (issue 26, part 4): everything that needs a CUDA GPU, on one host, in at
# most 8 minutes, into one results folder.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# The host needs a checkout, PyTorch with CUDA, transformers, accelerate, peft, grpcio and
# prometheus-client; no network. diffusers, if missing, is installed from GPU_WHEELS (default
# gpu_wheels/, ignored by git), which scripts/gpu_wheels.sh fills on a machine with network.
# Through the device tool: run(command="bash scripts/gpu_check.sh --out $OUT", carry=["gpu_wheels"],
# timeout_s=540): the results folder is then $OUT itself.
#
# Stages, in order, each under its own time limit; the limits shrink to what is left of
# GPU_CHECK_BUDGET_S (450 s), so the whole run ends inside 8 minutes. A stage that fails or runs
# out of time is recorded and the next one runs (those needing the pack pair are skipped without it):
#   wheels        diffusers importable, or installed from GPU_WHEELS into a temporary folder (and
#                 a stage "diffusers" then imports it with the host's transformers)
#   card          nvidia-smi --query-gpu=name,memory.total --format=csv (the card names the results)
#   tests         pytest -m cuda tests/test_cuda.py: fp16 edge steps, the device with --offload,
#                 memory released after a large request, the same image as diffusers
#   packs         the sd15 pair, true size (tandem-pack's cache, TANDEM_PACK_CACHE; built if absent)
#   batching      bench/gpu_batching.py: the edge's batch 1-16 in fp16 vs diffusers' static batch of
#                 the same UNet; the device's CUDA peak memory (large-only, default, --offload)
#   profile-demo  services.scheduler.learn.profiling on CUDA: profiles/demo_cuda.json (demo pack)
#   profile-sd15  the same on the sd15 pair: profiles/sd15_cuda.json
# then README.md (the tables) and stages.json (scripts/gpu_check_report.py). The results folder
# (default out/gpu_check/) holds 8 files, at most one folder down, as the device tool brings back:
#   README.md stages.json batching.json batching.md cuda_tests.xml log.txt
#   profiles/demo_cuda.json profiles/sd15_cuda.json
#
# --dry-run: the same stages on this machine's CPU with tiny packs, one timed repeat, limits and
# budget 4x: no card, and the CUDA tests run what needs no CUDA on the CPU in fp16
# (TANDEM_CUDA_TESTS_ON_CPU=1). CI runs it (tests/test_gpu_check.py), so the script cannot rot.
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3).
# Exit status 0 when every stage passed, else 1.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DRY=0
OUT=out/gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_check: error: --out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: error: unknown argument $1 (usage: scripts/gpu_check.sh [--dry-run] [--out DIR])" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
SCALE=1
[ $DRY = 1 ] && SCALE=4  # a shared CPU under load is no GPU host: the same stages, looser limits
BUDGET=${GPU_CHECK_BUDGET_S:-$((450 * SCALE))}
REPORT_S=20  # kept back for the report
WHEELS=${GPU_WHEELS:-$ROOT/gpu_wheels}
mkdir -p "$OUT/profiles" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{README.md,stages.json,batching.json,batching.md,cuda_tests.xml,log.txt} "$OUT"/profiles/{demo,sd15}_cuda.json
LOG=$OUT/log.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[gpu_check $((SECONDS))s] $*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$WORK/stages.tsv"; }

# stage NAME LIMIT_S COMMAND...: runs COMMAND under the limit (cut to the budget left), its output
# to the console, the log and $WORK/NAME.out; records the stage; returns its exit status.
stage() {
    local name=$1 limit=$(($2 * SCALE)) left status began rc
    shift 2
    left=$((BUDGET - REPORT_S - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then
        say "$name: skipped, the time budget is spent"
        record "$name" skipped 0 0 "time budget spent"
        return 1
    fi
    say "$name (limit ${limit} s): $*"
    began=$SECONDS
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" "$rc" $((SECONDS - began)) "$([ $rc = 0 ] || tail -n 1 "$WORK/$name.out" | tr '\t|' '  ' | cut -c1-160)"
    say "$name: $status ($((SECONDS - began)) s)"
    return "$rc"
}

skip() { say "$1: skipped, $2"; record "$1" skipped 0 0 "$2"; }

report() {
    "$PY" scripts/gpu_check_report.py --out "$OUT" --stages "$WORK/stages.tsv" --card "$WORK/card.out" \
        --budget-s "$BUDGET" --elapsed-s "$SECONDS" $([ $DRY = 1 ] && echo --dry-run)
    local rc=$?
    say "results in $OUT ($(find "$OUT" -type f | wc -l) files)"
    cat "$OUT/README.md" 2>/dev/null
    exit $rc
}

say "$([ $DRY = 1 ] && echo 'dry run (CPU, tiny packs)' || echo 'GPU run'): python $PY, results $OUT, budget ${BUDGET} s"

# --- wheels -----------------------------------------------------------------------------------
if "$PY" -c 'import diffusers' 2>/dev/null; then
    record wheels ok 0 0 "diffusers importable: nothing installed"
elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "wheels: diffusers is not importable and $WHEELS holds no wheels (scripts/gpu_wheels.sh makes them)"
    record wheels failed 1 0 "no diffusers and no wheels in $WHEELS"
    report
else
    stage wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl || report
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    # the host's own transformers and huggingface-hub must suit the carried diffusers: say so now if not
    stage diffusers 30 "$PY" -c 'import diffusers; from diffusers import StableDiffusionPipeline; print("diffusers", diffusers.__version__)' \
        || report
fi

# --- card -------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    record card ok 0 0 "dry run: no card"
else
    stage card 15 nvidia-smi --query-gpu=name,memory.total --format=csv
fi

# --- the rest ---------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
    export OMP_NUM_THREADS=1  # a shared CPU: one thread per process
    PAIR=$WORK/tiny-pair
    PAIR_FLAGS=(--tiny)
    BENCH_FLAGS=(--tiny --device cpu --repeats 1 --warmup 1)
    PROFILE_FLAGS=(--device cpu --repeats 1 --warmup 1 --batches 1,2 --threads 1)
    TEST_ENV=(TANDEM_CUDA_TESTS_ON_CPU=1)
else
    PAIR=$("$PY" -c 'from services.cli.pack import default_cache; print(default_cache() / "sd15")')
    PAIR_FLAGS=()
    BENCH_FLAGS=(--device cuda)
    PROFILE_FLAGS=(--device cuda)
    TEST_ENV=()
fi

stage tests 120 env "${TEST_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml "$OUT/cuda_tests.xml"
PAIR_OK=0
stage packs 150 "$PY" bench/gpu_batching.py --build-only --pair-dir "$PAIR" "${PAIR_FLAGS[@]}" && PAIR_OK=1
if [ $PAIR_OK = 1 ]; then
    stage batching 150 "$PY" bench/gpu_batching.py --pair-dir "$PAIR" --out "$OUT" "${BENCH_FLAGS[@]}"
else
    skip batching "no pack pair"
fi
stage profile-demo 60 "$PY" -m services.scheduler.learn.profiling --large tandem/demo_pack/large \
    --small tandem/demo_pack/small --device-class cuda-demo --out "$OUT/profiles/demo_cuda.json" "${PROFILE_FLAGS[@]}"
if [ $PAIR_OK = 1 ]; then
    stage profile-sd15 120 "$PY" -m services.scheduler.learn.profiling --large "$PAIR/large" --small "$PAIR/small" \
        --device-class cuda-sd15 --out "$OUT/profiles/sd15_cuda.json" "${PROFILE_FLAGS[@]}"
else
    skip profile-sd15 "no pack pair"
fi
report
