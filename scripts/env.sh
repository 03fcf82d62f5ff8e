# Sourced by the scripts: environment every command of the project runs under on CPU.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# Each checkout JIT-compiles DeepSpeed ops into its own folder (a shared one can hold a stale lock).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}"
export PYTHONUNBUFFERED=1
