"""Suite-wide set-up that must happen before any test module imports Triton.

Triton decides at import whether kernels are compiled or interpreted, so on a machine without
CUDA the interpreter is switched on here, before collection, for every test that runs a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
