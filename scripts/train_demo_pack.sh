#!/usr/bin/env bash
# Trains the demo model pack stage by stage into WORK_DIR, then assembles it into PACK_DIR and
# measures it (tools.demo_pack.pack_quality, which also tunes default_guidance).
#
#   scripts/train_demo_pack.sh WORK_DIR [ARGS for every stage, e.g. --tiny]
#
# Re-run the same command to continue: finished stages are skipped, an interrupted stage
# resumes from its checkpoint. Exit status: 0 = pack assembled (or the STAGES asked for done);
# 3 = stages still incomplete (time ran out: run again); anything else = an error.
#
# Environment (all optional):
#   PYTHON            interpreter (default: .venv/bin/python if present, else python3)
#   DEVICE            passed as --device to every stage (default: cuda if available)
#   TOTAL_MINUTES     wall-clock budget of this whole invocation (default 8)
#   EVALUATOR_MINUTES VAE_MINUTES TEXT_UNET_MINUTES SMALL_MINUTES LORA_MINUTES
#                     per-stage cap within one invocation (default: no cap but the total)
#   EVALUATOR_STEPS VAE_STEPS TEXT_UNET_STEPS SMALL_STEPS LORA_STEPS
#                     total steps per stage (default: each script's own)
#   PACK_DIR          where to assemble (default tandem/demo_pack)
#   QUALITY_N         prompts per quality measurement (default 256; 0 skips the measurement)
#   STAGES            which steps this invocation may run, in this order (default all:
#                     "evaluator vae text_unet small lora_alice lora_bob pack"); e.g. to end
#                     each call at a stage boundary, so that only finished outputs (not the
#                     larger checkpoints) need to survive between machines
set -euo pipefail

if [[ $# -lt 1 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
WORK_DIR=$1
shift
STAGE_ARGS=("$@")

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TOTAL_MINUTES=${TOTAL_MINUTES:-8}
STAGES=${STAGES:-"evaluator vae text_unet small lora_alice lora_bob pack"}
PACK_DIR=${PACK_DIR:-tandem/demo_pack}
QUALITY_N=${QUALITY_N:-256}
DEVICE_ARGS=()
if [[ -n "${DEVICE:-}" ]]; then DEVICE_ARGS=(--device "$DEVICE"); fi
START=$(date +%s)
mkdir -p "$WORK_DIR"

wanted() {
    [[ " $STAGES " == *" $1 "* ]]
}

remaining_minutes() {
    awk -v total="$TOTAL_MINUTES" -v start="$START" -v now="$(date +%s)" \
        'BEGIN { printf "%.2f", total - (now - start) / 60 }'
}

# run_stage NAME DONE_MARKER CAP_MINUTES STEPS MODULE [MODULE ARGS...]
run_stage() {
    local name=$1 marker=$2 cap=$3 steps=$4 module=$5
    shift 5
    if ! wanted "$name"; then
        echo "== $name: not in STAGES, skipped"
        return 0
    fi
    if [[ -e "$WORK_DIR/$marker" ]]; then
        echo "== $name: done ($WORK_DIR/$marker exists)"
        return 0
    fi
    local minutes
    minutes=$(awk -v left="$(remaining_minutes)" -v cap="$cap" \
        'BEGIN { m = (cap != "" && cap + 0 < left + 0) ? cap : left; printf "%.2f", m }')
    if awk -v m="$minutes" 'BEGIN { exit !(m < 0.75) }'; then
        echo "== $name: not enough time left in this invocation; run again to continue"
        exit 3
    fi
    local step_args=()
    if [[ -n "$steps" ]]; then step_args=(--steps "$steps"); fi
    echo "== $name: training for up to $minutes min"
    "$PYTHON" -m "tools.demo_pack.$module" --out "$WORK_DIR" --max-minutes "$minutes" \
        "${step_args[@]}" "${DEVICE_ARGS[@]}" "$@" "${STAGE_ARGS[@]}"
    if [[ ! -e "$WORK_DIR/$marker" ]]; then
        echo "== $name: paused at its checkpoint (time budget reached); run again to continue"
        exit 3
    fi
}

run_stage evaluator evaluator/config.json "${EVALUATOR_MINUTES:-}" "${EVALUATOR_STEPS:-}" \
    train_evaluator
run_stage vae vae/config.json "${VAE_MINUTES:-}" "${VAE_STEPS:-}" train_vae
run_stage text_unet unet/config.json "${TEXT_UNET_MINUTES:-}" "${TEXT_UNET_STEPS:-}" train_text_unet
run_stage small small_unet/config.json "${SMALL_MINUTES:-}" "${SMALL_STEPS:-}" train_small
for user in alice bob; do
    run_stage "lora_$user" "loras/$user/pytorch_lora_weights.safetensors" \
        "${LORA_MINUTES:-}" "${LORA_STEPS:-}" train_lora --user "$user"
done

if ! wanted pack; then
    echo "== requested stages done ($STAGES)"
    exit 0
fi
echo "== assembling $PACK_DIR"
"$PYTHON" -m tools.demo_pack.assemble_pack "$WORK_DIR" "$PACK_DIR"
if [[ "$QUALITY_N" -gt 0 ]]; then
    echo "== measuring $PACK_DIR (report: $WORK_DIR/pack_quality.json, images: $WORK_DIR/samples)"
    "$PYTHON" -m tools.demo_pack.pack_quality "$PACK_DIR" --n "$QUALITY_N" --tune-guidance \
        --report "$WORK_DIR/pack_quality.json" --samples "$WORK_DIR/samples" "${DEVICE_ARGS[@]}"
fi
echo "== pack ready: $PACK_DIR"
