#!/usr/bin/env bash
# The paper's comparison in miniature: long-short, window-only and full attention of the same width, depth,
# parameter count (window and full get the slightly wider FFN that makes up for long-short's extra attention
# parameters: megatron_ls/training/sizing.py) and steps, trained on the same data one after the other (one process each), then the test BPC of each at several
# contexts by the paper's protocol (tools/evaluate.py --context), two pictures and a table:
#   OUT/valid_bpc.png              validation BPC against step        (tools/plot_runs.py)
#   OUT/test_bpc_by_context.png    test BPC against context length    (tools/compare_runs.py)
#   OUT/summary.json               the table's numbers
# Default: the embedded corpus, a 2-layer width-128 model, 300 steps: a few minutes on 2 CPU cores.
#
#   bash examples/compare_attention.sh [--data-path P] [--out DIR] [--iters N] [--contexts "128 256 512 1024"]
#                                      [--types "long-short window full"] [--eval-tokens N]
# Re-running retrains from scratch (OUT/<type> is replaced).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
python -c "import torch, deepspeed, matplotlib" 2>/dev/null || bash "$root/scripts/setup_env.sh"

data=""
out="runs/compare"
iters=300
contexts="128 256 512 1024"
types="long-short window full"
eval_tokens=()  # default: the whole test split
while [ $# -gt 0 ]; do
  case "$1" in
    --data-path) data="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    --contexts) contexts="$2"; shift 2 ;;
    --types) types="$2"; shift 2 ;;
    --eval-tokens) eval_tokens=(--max-tokens "$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "compare_attention.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$data" ]; then
  data="data/default/pydoc"
  [ -f "$data.json" ] || python tools/preprocess_data.py --dataset default --output-prefix "$data" --no-progress
elif [ ! -f "$data.json" ]; then
  echo "compare_attention.sh: error: $data.json not found (a prefix written by tools/preprocess_data.py)" >&2
  exit 1
fi

step=128  # tokens predicted per forward in the evaluation; the context adds memory to it
runs=()
for type in $types; do
  run="$out/$type"
  rm -rf "$run"
  mkdir -p "$out"
  ffn=$(python -c "from megatron_ls.model import TransformerLSConfig as C; from megatron_ls.training.sizing import \
equal_size_ffn; print(equal_size_ffn(C(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, \
window_size=32, chunk_size=8, attention_type='$type')))" 2>/dev/null) || { echo "compare_attention.sh: error: unknown type $type" >&2; exit 2; }
  echo "== training $type (FFN $ffn) -> $run (log: $run.log)"
  python pretrain_char_lm.py --data-path "$data" --attention-type "$type" \
    --num-layers 2 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size "$ffn" \
    --window-size 32 --chunk-size 8 --chunk-rank 1 --seq-length 128 --mem-length 128 --dropout 0.1 \
    --micro-batch-size 8 --global-batch-size 8 --train-iters "$iters" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine --weight-decay 0.01 --seed 1234 \
    --log-interval 10 --eval-interval $(( iters / 10 > 0 ? iters / 10 : 1 )) --eval-iters 20 --save "$run" \
    > "$run.log" 2>&1 || { tail -n 5 "$run.log" >&2; echo "compare_attention.sh: error: training $type failed" >&2; exit 1; }
  grep -E "^(Transformer-LS|training done| final validation)" "$run.log" || true
  for ctx in $contexts; do
    python tools/evaluate.py --model "$run" --data-path "$data" --split test --context "$ctx" --step "$step" \
      --no-progress "${eval_tokens[@]}" --output "$run/eval/context_$ctx.json"
  done
  runs+=("$run")
done

python tools/plot_runs.py "${runs[@]}" --panels valid_bpc --output "$out/valid_bpc.png" \
  --title "validation BPC, $iters steps"
python tools/compare_runs.py "${runs[@]}" --output "$out/test_bpc_by_context.png" \
  --summary "$out/summary.json"
