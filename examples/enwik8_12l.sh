#!/usr/bin/env bash
# Transformer-LS 12 layers on enwik8 (paper: 0.99 test BPC, 44M parameters), three phases.
#   python tools/preprocess_data.py --dataset enwik8 --download --output-prefix data/enwik8/enwik8
#   LAUNCH="deepspeed --num_gpus 8" bash examples/enwik8_12l.sh
PRESET=enwik8-12l
DATA="${DATA:-data/enwik8/enwik8}"
OUT="${OUT:-runs/enwik8-12l}"
LRS="2.5e-4 1.25e-4 6.25e-5"
WD=0.01
DROPOUT=0.2
DS_CONFIG="$(dirname "${BASH_SOURCE[0]}")/ds_config_enwik8_12l.json"
source "$(dirname "${BASH_SOURCE[0]}")/phases.sh"
