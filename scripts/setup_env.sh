#!/usr/bin/env bash
# Create (or reuse) .venv inside the repo and install the pinned requirements.
# torch is installed first and pinned: an unpinned torch pulled in by another package
# would download a multi-GB CUDA build; deepspeed builds against the torch already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.megatron_ls_stamp"
want="$(cat "$root/requirements.txt" "$root/setup.py" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import megatron_ls, torch, deepspeed" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating/updating $venv" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install --no-build-isolation -r "$root/requirements.txt"
# CUDA torch pins its own triton; the CPU build has none, and the kernel tests run it interpreted.
"$venv/bin/python" -c "import triton" 2>/dev/null || "${pip[@]}" install triton==3.9.0
"${pip[@]}" install --no-build-isolation --no-deps -e "$root"
echo "$want" > "$stamp"
