"""`taskvec info` and `taskvec verify`: what a checkpoint, vector or adapter holds, and whether
its files are sound."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from taskvec.adapter import Adapter, LoraFactors, is_adapter
from taskvec.errors import TaskVecError
from taskvec.reader import FLOAT_DTYPES, Checkpoint, dtype_name
from taskvec.resolve import resolve
from taskvec.sources import kind as checkpoint_kind

BLOCK_ELEMS = 1 << 20
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group key for per-layer norms: 'layers.7', or the tensor's own name outside layers."""
    match = _LAYER.search(name)
    return f"layers.{match[1]}" if match else name.removeprefix("base_model.model.")


def lora_norm(adapter: Adapter, lora: LoraFactors) -> float:
    """‖s·B·A‖_F from the r×r Gram matrices, never forming ΔW."""
    a = adapter.checkpoint.read_tensor(lora.a).double()
    b = adapter.checkpoint.read_tensor(lora.b).double()
    gram = (b.T @ b) * (a @ a.T)
    return abs(lora.scale) * math.sqrt(max(gram.sum().item(), 0.0))


def _sorted_layers(sums: dict[str, float]) -> dict[str, float]:
    def key(name):
        match = re.fullmatch(r"layers\.(\d+)", name)
        return (0, int(match[1]), "") if match else (1, 0, name)
    return {k: sums[k] ** 0.5 for k in sorted(sums, key=key)}


def info(path) -> dict:
    """Kind, tensor count, dtypes, bytes; per-layer delta norms for vectors and adapters."""
    path = resolve(path)
    kind = checkpoint_kind(path)
    adapter = Adapter(path) if kind == "lora_adapter" else None
    ckpt = adapter.checkpoint if adapter else Checkpoint(path)
    tensors = ckpt.tensors.values()
    result = {
        "path": str(path), "kind": kind, "tensors": len(tensors),
        "dtypes": dict(Counter(dtype_name(t.dtype) for t in tensors)),
        "bytes": sum(t.nbytes for t in tensors),
    }
    squares: dict[str, float] = defaultdict(float)
    if adapter:
        for edit in adapter.edits.values():
            if edit.lora is not None:
                squares[layer_of(edit.name)] += lora_norm(adapter, edit.lora) ** 2
    elif kind == "task_vector":
        buffer = bytearray(BLOCK_ELEMS * 8)
        for t in tensors:
            if t.dtype in FLOAT_DTYPES:
                for block in ckpt.iter_blocks(t, BLOCK_ELEMS, buffer):
                    squares[layer_of(t.name)] += block.double().square().sum().item()
    ckpt.close()
    if squares:
        result["layer_norms"] = _sorted_layers(squares)
    return result


def verify(path) -> dict:
    """Check headers, offsets, index coverage and that every float value is finite."""
    path = resolve(path)
    ckpt = Adapter(path).checkpoint if is_adapter(path) else Checkpoint(path)
    try:  # headers, offsets and index coverage were checked when the checkpoint was opened
        buffer = bytearray(BLOCK_ELEMS * 8)
        for t in ckpt.tensors.values():
            if t.dtype not in FLOAT_DTYPES:
                continue
            for block in ckpt.iter_blocks(t, BLOCK_ELEMS, buffer):
                if not block.isfinite().all():
                    raise TaskVecError(f"{t.path}: tensor {t.name}: holds NaN/Inf")
    finally:
        ckpt.close()
    return {"path": str(path), "kind": checkpoint_kind(path), "shards": len(ckpt.shards),
            "tensors": len(ckpt.tensors), "bytes": sum(t.nbytes for t in ckpt.tensors.values())}
