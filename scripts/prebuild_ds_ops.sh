#!/usr/bin/env bash
# Build DeepSpeed's one JIT op used on CPU (the shared-memory collectives, about a minute on 2 cores)
# once, before any test starts: a test timeout that killed a build half-way would leave a `lock` file
# in TORCH_EXTENSIONS_DIR that blocks every later build. Sourced env: scripts/env.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
# A build takes about a minute: a lock older than 15 minutes was left by a killed build.
[ -d "$TORCH_EXTENSIONS_DIR" ] && find "$TORCH_EXTENSIONS_DIR" -name lock -type f -mmin +15 -delete
python - <<'PY'
import deepspeed
from deepspeed.comm.torch import build_shm_op
build_shm_op()
PY
