# Shared by the paper's recipes (sourced, not run): three phases of 2048 / 4096 / 8192 tokens,
# memory = segment length, the learning rate halved each phase, each later phase starting from
# the previous phase's weights with --finetune (fresh optimizer, schedule and iteration count).
# A phase whose folder already holds a checkpoint resumes it instead (re-run the script after a stop).
#
# Set before sourcing: PRESET, DATA, OUT, LRS (3 values), WD, DROPOUT, DS_CONFIG.
# Optional: LAUNCH (default: every local GPU via `deepspeed`), GBS (3 values: lanes per step),
#           ITERS (3 values), WARMUP (3 values), RECOMPUTE (3 values: none | selective | full, the
#           activation recomputation of each phase), EXTRA (more flags for every phase).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
LAUNCH="${LAUNCH:-deepspeed}"            # e.g. "deepspeed --num_gpus 8" or "deepspeed --hostfile examples/hostfile"
SEQS=(2048 4096 8192)
ITERS=(${ITERS:-430000 50000 50000})
WARMUP=(${WARMUP:-10000 5000 5000})
GBS=(${GBS:-32 16 8})                    # our choice: 64K tokens per step in every phase
LRS=(${LRS})
RECOMPUTE=(${RECOMPUTE:-none none none})
EXTRA="${EXTRA:-}"

# --clip-grad 0.25 is Transformer-XL's enwik8 value (the anchors do not list the paper's).
run_phase() {  # phase index 0..2
  local i=$1 dir="$OUT/phase$(($1 + 1))" load=() recompute=()
  case "${RECOMPUTE[$i]}" in
    none) ;;
    selective) recompute=(--recompute-granularity selective) ;;   # the attention scores only (Megatron's selective)
    full) recompute=(--checkpoint-activations) ;;                 # every layer
    *) echo "phases.sh: RECOMPUTE must hold none|selective|full for each phase, got '${RECOMPUTE[$i]}'" >&2; exit 2 ;;
  esac
  if [ -f "$dir/latest" ]; then
    load=(--load "$dir")                                  # resume this phase exactly
  elif [ "$i" -gt 0 ]; then
    load=(--load "$OUT/phase$i" --finetune)               # start from the previous phase's weights
  fi
  # shellcheck disable=SC2086
  $LAUNCH "$root/pretrain_char_lm.py" \
    --preset "$PRESET" --data-path "$DATA" \
    --seq-length "${SEQS[$i]}" --mem-length "${SEQS[$i]}" --dropout "$DROPOUT" \
    --global-batch-size "${GBS[$i]}" --micro-batch-size 1 \
    --train-iters "${ITERS[$i]}" --lr "${LRS[$i]}" --lr-warmup-iters "${WARMUP[$i]}" --lr-decay-style constant \
    --weight-decay "$WD" --clip-grad 0.25 \
    --deepspeed_config "$DS_CONFIG" \
    --save "$dir" --save-interval 5000 --keep-last 2 \
    --eval-interval 10000 --eval-iters 50 --log-interval 100 --tensorboard-dir "$dir/tensorboard" \
    "${load[@]}" "${recompute[@]}" $EXTRA
}

for phase in 0 1 2; do
  run_phase "$phase"
done
