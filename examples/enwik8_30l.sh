#!/usr/bin/env bash
# Transformer-LS 30 layers on enwik8 (paper: 0.97 test BPC, 110M parameters, ~8 days on 8 V100 32GB).
#   LAUNCH="deepspeed --hostfile examples/hostfile" bash examples/enwik8_30l.sh
PRESET=enwik8-30l
DATA="${DATA:-data/enwik8/enwik8}"
OUT="${OUT:-runs/enwik8-30l}"
LRS="2.5e-4 1.25e-4 6.25e-5"
WD=0.1
DROPOUT=0.4
DS_CONFIG="$(dirname "${BASH_SOURCE[0]}")/ds_config_enwik8_30l.json"
# Activation checkpointing keeps the 8192-token phase within 32 GB.
EXTRA="${EXTRA:---checkpoint-activations}"
source "$(dirname "${BASH_SOURCE[0]}")/phases.sh"
