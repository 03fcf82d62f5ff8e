"""DeepSpeed's JIT-built op on CPU: a build or load killed half-way must not hang every later run.

torch.utils.cpp_extension marks a build in progress with a `lock` file in the op's build folder and makes
every other process wait for that file to go, with no limit. A process killed while it holds the file
(SIGKILL, or the SIGTERM a launcher sends to the other ranks when one fails during start-up) leaves it
behind, and every later start then waits silently forever.

Our processes load the op under a kernel lock (flock), which the kernel releases when its holder dies,
however it dies. Whoever holds the flock knows that no process of ours is inside the op's load, so a
`lock` file found then is stale: it is removed, with one line on stderr. This assumes the extensions folder
is not shared with other programs building the same op at the same moment (scripts/env.sh gives each
checkout its own TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sys

SHM_OP = "deepspeed_shm_comm"  # the one op DeepSpeed builds on CPU (its shared-memory collectives)


def op_build_folder(name: str) -> str | None:
    """Where torch builds op `name` (TORCH_EXTENSIONS_DIR or its default), or None if torch cannot say."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - a private torch helper: without it there is simply nothing to guard
        return None


def load_shm_op_guarded() -> None:
    """Load (building it if needed) DeepSpeed's CPU collectives op under the flock, clearing a stale lock first.

    DeepSpeed's own init_distributed loads it again afterwards: by then it is built and the load is quick.
    """
    folder = op_build_folder(SHM_OP)
    if folder is None:
        return
    from deepspeed.comm.torch import build_shm_op

    with open(os.path.join(os.path.dirname(folder), f".{SHM_OP}.megatron_ls.flock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits only for a live process of ours
        try:
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                os.remove(stale)
                print(f"removed {stale}, left by a process killed while it built or loaded DeepSpeed's "
                      f"{SHM_OP} op", file=sys.stderr)
            with contextlib.redirect_stdout(io.StringIO()):  # its "built successfully": DeepSpeed prints it again
                build_shm_op()
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
