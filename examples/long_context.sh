#!/usr/bin/env bash
# Long contexts: enwik8-12l on segments of 262,144 tokens (memory = segment: 512K tokens of context per prediction),
# each segment split over the 8 GPUs (--sequence-parallel-size 8, DeepSpeed-Ulysses: projections and norms on
# 32K tokens per GPU, the attention core on the whole sequence of one head per GPU). The start-up line prints the
# memory estimate per GPU (bench/longest_sequence.py: enwik8-12l reaches about 1.5M tokens per segment on 8 x 80 GB
# without recomputation, 6M with --checkpoint-activations).
#   python tools/preprocess_data.py --dataset enwik8 --download --output-prefix data/enwik8/enwik8
#   bash examples/long_context.sh            # LAUNCH="deepspeed --hostfile examples/hostfile" for several nodes
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCH="${LAUNCH:-deepspeed --num_gpus 8}"
DATA="${DATA:-data/enwik8/enwik8}"
OUT="${OUT:-runs/enwik8-12l-256k}"
SEQ="${SEQ:-262144}"
SP="${SP:-8}"
EXTRA="${EXTRA:-}"
# shellcheck disable=SC2086
$LAUNCH "$root/pretrain_char_lm.py" \
  --preset enwik8-12l --data-path "$DATA" \
  --seq-length "$SEQ" --mem-length "$SEQ" --sequence-parallel-size "$SP" \
  --global-batch-size 1 --micro-batch-size 1 \
  --train-iters 20000 --lr 1e-4 --lr-warmup-iters 1000 --lr-decay-style cosine --min-lr 1e-5 \
  --weight-decay 0.01 --clip-grad 0.25 --bf16 --zero-stage 1 \
  --save "$OUT" --load "$OUT" --save-interval 500 --keep-last 2 \
  --eval-interval 1000 --eval-iters 4 --log-interval 10 --tensorboard-dir "$OUT/tensorboard" $EXTRA
