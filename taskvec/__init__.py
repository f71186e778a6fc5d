"""Streaming task vectors over safetensors checkpoints and LoRA adapters.

    import taskvec
    taskvec.negate("llama2-7b", "runs/sku/theta_bad", "runs/sku/model", scale=1.0)

Every operation plans from headers, streams tensors in bounded memory, computes in fp32,
rounds once, and writes atomically (temporary sibling, fsync, rename).
"""

from taskvec.errors import TaskVecError
from taskvec.inspection import info, verify
from taskvec.operations import apply, diff, negate, negate_adapter
from taskvec.resolve import resolve
from taskvec.sources import kind
from taskvec.writer import OutputDir, write_atomic, write_json

__all__ = [
    "OutputDir", "TaskVecError", "apply", "diff", "info", "kind", "negate", "negate_adapter",
    "resolve", "verify", "write_atomic", "write_json",
]
