#!/usr/bin/env bash
# Transformer-LS 12 layers on text8 (paper: 1.09 test BPC), three phases.
#   python tools/preprocess_data.py --dataset text8 --download --output-prefix data/text8/text8
#   LAUNCH="deepspeed --num_gpus 8" bash examples/text8_12l.sh
PRESET=text8-12l
DATA="${DATA:-data/text8/text8}"
OUT="${OUT:-runs/text8-12l}"
LRS="5e-4 2.5e-4 1.25e-4"
WD=0.01
DROPOUT=0.2
DS_CONFIG="$(dirname "${BASH_SOURCE[0]}")/ds_config_text8_12l.json"
source "$(dirname "${BASH_SOURCE[0]}")/phases.sh"
