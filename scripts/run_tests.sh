#!/usr/bin/env bash
# Set up the environment and run the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_env.sh"
bash "$here/prebuild_ds_ops.sh"
source "$here/env.sh"
cd "$root"
exec python -m pytest -q "$@"
