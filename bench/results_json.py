"""Writing a benchmark's JSON so that a run cut short still leaves a whole file.

Benchmarks call write_json after every row: the file on disk is always complete JSON holding every row measured so
far (written to a temporary name, then renamed over the old file), so a time limit or a crash loses only the row in
flight. bench/gpu_check.sh relies on this.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
