#!/usr/bin/env bash
# Transformer-LS 30 layers on enwik8 (paper: 0.97 test BPC, 110M parameters, ~8 days on 8 V100 32GB), written for
# that machine: 8 x V100 32 GB (sm_70, no bf16), so fp16 with DeepSpeed's dynamic loss scaling (the JSON's fp16
# section) and the attention core `auto` picks there: `blocked` on cuBLAS's fp16 tensor cores (docs/V100.md).
#   LAUNCH="deepspeed --num_gpus 8" bash examples/enwik8_30l.sh
# Memory per GPU (bench/memory.py --precision fp16 --impl blocked --overlap-comm, ZeRO-2; docs/V100.md): phase 1
# 6.0 GiB and phase 2 10.0 GiB without recomputation; phase 3 (N = M = 8192) 20.2 GiB without it, 9.5 GiB with the
# selective recomputation of the attention scores, kept as margin until the estimate is checked on a V100.
PRESET=enwik8-30l
DATA="${DATA:-data/enwik8/enwik8}"
OUT="${OUT:-runs/enwik8-30l}"
LRS="2.5e-4 1.25e-4 6.25e-5"
WD=0.1
DROPOUT=0.4
DS_CONFIG="$(dirname "${BASH_SOURCE[0]}")/ds_config_enwik8_30l.json"
RECOMPUTE="${RECOMPUTE:-none none selective}"
EXTRA="${EXTRA:---fp16 --attention-impl auto}"
source "$(dirname "${BASH_SOURCE[0]}")/phases.sh"
