#!/usr/bin/env bash
# One-shot check for a GPU machine: benchmarks first, then the tests, every result and log in ONE tarball.
#
#   bash bench/gpu_check.sh [--tarball PATH] [--out DIR]   # on a GPU (a lent machine: --tarball "$OUT/gpu_check.tgz")
#   bash bench/gpu_check.sh --dry-run [--tarball PATH] [--out DIR]   # on the CPU: the same steps at tiny sizes
#
# Steps, in order (each under its own cap; the caps add up to at most 7 minutes, checked below, printed first):
#   python              the interpreter: $PYTHON, or .venv/bin/python, python, python3 (the first that imports torch
#                       and, outside --dry-run, sees a CUDA device)
#   probe               torch / Triton / the device
#   attention_m0, _mN   bench/attention.py, bf16, 32K tokens per step, N = 32K / 8K / 4K / 2K, memory M = 0 and M = N:
#                       fused (window position band), full (SDPA: flash), window (FlexAttention's sliding window)
#   attention_table_*   the same for fused with the window position table (MEGATRON_LS_WINDOW_POS=table)
#   pos_mode, train_throughput   whole enwik8-12l model, long-short vs full, N = 8K and 32K, in the window
#                       position mode that was faster for one layer at 32K
#   memory              bench/memory.py: the estimate and a measured 2-layer slice of enwik8-30l at N = M = 8192 (bf16)
#   memory_v100_path    the same for the V100 path (fp16, blocked core: what `auto` picks on sm_70)
#   tests_kernels       tests/kernels/test_kernels_fused.py (tile 0); tests_cuda: every other test named *cuda*
#   tile1..3            the other autotune tiles on the bf16 cases
#   summary, tar        bench/gpu_check_summary.py: the short table (summary.txt); the tarball
# Each benchmark rewrites its JSON after every row, so a step stopped at its cap keeps the rows it measured.
# The last line printed is the tarball's path.
# --dry-run: CPU only, tiny sizes, fused kernels under Triton's interpreter, tests collected but not run: proves the
# sequence, the caps and the tarball (tests/bench/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
dry=0 out="" tarball=""
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    --tarball) tarball="${2:?--tarball needs a path}"; shift ;;
    *) echo "gpu_check: error: unknown argument '$1' (--dry-run, --out DIR, --tarball PATH)" >&2; exit 2 ;;
  esac
  shift
done
if ((dry)); then out="${out:-$root/bench/results/gpu_check_dry_run}"; else out="${out:-$root/bench/results/gpu_check}"; fi
tarball="${tarball:-$out.tar.gz}"
if [[ -e "$out" && ! -e "$out/caps.txt" && -n "$(ls -A "$out" 2>/dev/null)" ]]; then
  echo "gpu_check: error: $out exists and is not an earlier gpu_check's folder; pick another --out" >&2; exit 2
fi
rm -rf "$out" && mkdir -p "$out" "$(dirname "$tarball")" || { echo "gpu_check: error: cannot create $out" >&2; exit 2; }

# name:cap (seconds), everything the script does after this line: the sum must stay <= LIMIT (a lent GPU machine
# gives about 15 minutes for everything, its start and the copies included).
LIMIT=420
CAPS=(python:24 probe:10 attention_m0:60 attention_mN:55 attention_table_m0:25 attention_table_mN:25 pos_mode:3
      train_throughput:55 memory:20 memory_v100_path:20 tests_kernels:51 tests_cuda:20 tile1:15 tile2:15 tile3:15
      summary:4 tar:3)
declare -A cap
total=0
for entry in "${CAPS[@]}"; do cap[${entry%%:*}]=${entry##*:}; total=$((total + ${entry##*:})); done
((total <= LIMIT)) || { echo "gpu_check: error: the step caps add up to $total s > $LIMIT s"; exit 2; }
echo "gpu_check: step caps (s): ${CAPS[*]} | total $total s <= $LIMIT s" | tee "$out/caps.txt"

export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"
if ((dry)); then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu TRITON_INTERPRET=1
  probe='import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'
else
  unset TRITON_INTERPRET DS_ACCELERATOR
  probe='import torch, sys; sys.exit(not torch.cuda.is_available())'
fi
start=$SECONDS
status() { echo "[gpu_check +$((SECONDS - start))s] $1 (cap ${cap[$1]} s)"; }
status python
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in .venv/bin/python python python3; do  # 3 x 8 s at most: the python cap
    if command -v "$candidate" >/dev/null 2>&1 && timeout -k 1 7 "$candidate" -c "$probe" >/dev/null 2>&1; then
      PY="$candidate"; break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "gpu_check: error: no python / python3 here imports torch$( ((dry)) || echo ' and sees a CUDA device')"
                    exit 2; }
echo "gpu_check: python: $PY ($(command -v "$PY")), results in $out" | tee -a "$out/caps.txt"

declare -A rc
# step NAME CMD...: run CMD under the step's cap (a TERM, then a KILL 2 s later), log to NAME.log, record the rc.
step() {
  local name=$1 limit=${cap[$1]}
  shift
  status "$name"
  timeout -k 2 $((limit - 2)) "$@" > "$out/$name.log" 2>&1
  rc[$name]=$?
  tail -n 4 "$out/$name.log" | sed 's/^/    /'
}

step probe "$PY" -c "
import torch, sys
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), 'sm_%d%d' % torch.cuda.get_device_capability(0))
"

if ((dry)); then
  att=(--device cpu --dtype fp32 --sizes 32 --tokens 32 --hidden 32 --heads 2 --window 16 --chunk 8 --repeat 1)
  tput=(--device cpu --sizes 64 --layers 1 --batch 1 --steps 1 --warmup 1)
  # The preset's slice (width 512) under Triton's interpreter takes minutes: the dry run measures it on `blocked`.
  mem=(--seq-length 64 --device cpu --measure-layers 1 --measure-seq 64) mem_impl=blocked
  pytest_mode=(--collect-only)
else
  att=(--device cuda --dtype bf16 --sizes 32768,8192,4096,2048 --tokens 32768 --repeat 10)
  tput=(--device cuda --sizes 8192,32768 --steps 5 --warmup 2)
  mem=(--seq-length 8192 --device cuda --measure-layers 2) mem_impl=fused
  pytest_mode=(-rs)
fi
for m in 0 N; do
  ratio=$([[ $m == 0 ]] && echo 0 || echo 1)
  step "attention_m$m" "$PY" bench/attention.py "${att[@]}" --impls fused,full,window --mem-ratio "$ratio" \
    --no-layer --output "$out/attention_m$m.json"
done
for m in 0 N; do
  ratio=$([[ $m == 0 ]] && echo 0 || echo 1)
  step "attention_table_m$m" env MEGATRON_LS_WINDOW_POS=table "$PY" bench/attention.py "${att[@]}" --impls fused \
    --mem-ratio "$ratio" --no-layer --output "$out/attention_table_m$m.json"
done
status pos_mode
pos_mode=$(timeout -k 1 $((cap[pos_mode] - 1)) "$PY" bench/gpu_check_summary.py "$out" --pos-mode 2>/dev/null || echo band)
step train_throughput env MEGATRON_LS_WINDOW_POS="$pos_mode" "$PY" bench/train_throughput.py "${tput[@]}" \
  --presets enwik8-12l --types long-short,full --output "$out/train_throughput.json"
step memory "$PY" bench/memory.py --preset enwik8-30l --gpus 8 --precision bf16 --impl "$mem_impl" "${mem[@]}" \
  --output "$out/memory.json"
step memory_v100_path "$PY" bench/memory.py --preset enwik8-30l --gpus 8 --precision fp16 --impl blocked \
  --overlap-comm "${mem[@]}" --output "$out/memory_v100_path.json"

step tests_kernels env MEGATRON_LS_TRITON_CONFIG=0 "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" \
  tests/kernels/test_kernels_fused.py
step tests_cuda env MEGATRON_LS_TRITON_CONFIG=0 "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" tests \
  -k cuda --ignore=tests/kernels/test_kernels_fused.py --continue-on-collection-errors
[[ ${rc[tests_cuda]} == 5 ]] && rc[tests_cuda]=0  # 5 = no test selected
for tile in 1 2 3; do
  step "tile$tile" env MEGATRON_LS_TRITON_CONFIG=$tile "$PY" -m pytest -q -p no:cacheprovider "${pytest_mode[@]}" \
    tests/kernels/test_kernels_fused.py -k "bf16 and (ragged or clamped)"
  [[ ${rc[tile$tile]} == 5 ]] && rc[tile$tile]=0
done

for k in "${!rc[@]}"; do echo "$k=${rc[$k]}"; done | sort > "$out/rc.txt"
status summary
timeout -k 1 $((cap[summary] - 1)) "$PY" bench/gpu_check_summary.py "$out" 2>&1 | tee "$out/summary.log"
status tar
echo "elapsed before tar: $((SECONDS - start)) s" >> "$out/caps.txt"
timeout -k 1 $((cap[tar] - 1)) tar -czf "$tarball" -C "$(dirname "$out")" "$(basename "$out")" \
  || { echo "gpu_check: error: tar failed"; exit 1; }
echo "gpu_check: tarball: $tarball"
