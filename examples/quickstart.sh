#!/usr/bin/env bash
# The README's first command: set up, preprocess the embedded corpus (CPython's pydoc topics, no
# download), train a small Transformer-LS on CPU with 2 processes through the `deepspeed` launcher,
# then report the validation bits per character. A few minutes on 2 cores.
#
# Re-running resumes from runs/quickstart (and only evaluates once training is complete);
# delete that folder to start over. Overridable: QS_DATA, QS_OUT, QS_ITERS, QS_NPROC, QS_PORT.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
source "$root/scripts/env.sh"
cd "$root"

data="${QS_DATA:-data/default/pydoc}"
out="${QS_OUT:-runs/quickstart}"
iters="${QS_ITERS:-300}"
nproc="${QS_NPROC:-2}"
port="${QS_PORT:-29500}"

if [ ! -f "$data.json" ]; then
  python tools/preprocess_data.py --dataset default --output-prefix "$data"
fi

# On CPU the launcher takes --num_gpus as the number of processes (DS_ACCELERATOR=cpu, gloo).
deepspeed --num_gpus "$nproc" --master_port "$port" pretrain_char_lm.py \
  --data-path "$data" \
  --num-layers 2 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 512 \
  --window-size 64 --chunk-size 16 --chunk-rank 1 --mem-length 128 --dropout 0.0 \
  --seq-length 128 --micro-batch-size 8 --global-batch-size $((8 * nproc)) \
  --train-iters "$iters" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.01 --clip-grad 1.0 --seed 1234 \
  --log-interval 20 --eval-interval 100 --eval-iters -1 \
  --save "$out" --load "$out" --save-interval 100 --keep-last 2 --tensorboard-dir "$out/tensorboard"

python - "$out" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in recs if "lm_loss" in r]
valid = [r for r in recs if "valid_bpc" in r]
print(f"quickstart: training loss {train[0]['lm_loss']:.3f} -> {train[-1]['lm_loss']:.3f} nats/token; "
      f"valid BPC {valid[-1]['valid_bpc']:.3f} at iteration {valid[-1]['iteration']}")
PY

# SAMPLING (inference issue): consolidate the checkpoint, test-split BPC by the paper's protocol, sample.
python tools/convert_checkpoint.py --load "$out" --output "$out/consolidated" --overwrite
python tools/evaluate.py --model "$out/consolidated" --data-path "$data" --split test --context 512 --step 128 \
  --output "$out/test_bpc.json"
python tools/generate.py --model "$out/consolidated" --prompt "The " --max-new-tokens 200 \
  --temperature 0.8 --top-k 40 --seed 1234
