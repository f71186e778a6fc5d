"""Set once, before anything can import triton: triton 3.x reads TRITON_INTERPRET when
@triton.jit decorates a function, including its own, so a later setting is ignored. Without a
GPU the Triton kernels then run under the interpreter (fp32 only, ~400x slower)."""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
