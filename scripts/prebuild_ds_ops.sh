#!/usr/bin/env bash
# Build DeepSpeed's one JIT op used on CPU (the shared-memory collectives, about a minute on 2 cores)
# once, before any test starts, so that no test's timeout falls inside a build. Sourced env: scripts/env.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
# Under the same guard as training (megatron_ls/training/op_build_guard.py): a `lock` left by a killed build
# is removed, one held by a live build of ours is waited for.
cd "$here/.."
python - <<'PY'
from megatron_ls.training.op_build_guard import load_shm_op_guarded
load_shm_op_guarded()
print("DeepSpeed's CPU op is built")
PY
