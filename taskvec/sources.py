"""What a delta is: a full checkpoint (t − b), a stored task vector (v), or a LoRA adapter
((R − b) + s·B·A).

A source is checked against the base from headers alone (names, shapes, dtypes, vocabulary),
then asked for the fp32 delta of one block of rows at a time. Sources read through the reader
and never open a file; `kind()` says which source a path is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from taskvec import provenance
from taskvec.adapter import Adapter, LoraFactors, TensorEdit, is_adapter, match_names
from taskvec.errors import TaskVecError
from taskvec.reader import FLOAT_DTYPES, Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

_VOCAB_NAMES = re.compile(r"embed|lm_head|wte|word_embeddings|output\.weight$")


def kind(path: Path, checkpoint: Checkpoint | None = None) -> str:
    """"lora_adapter", "task_vector" (written by `diff`, per its taskvec.json or, when that is
    gone, its shards' metadata) or "model"."""
    if is_adapter(path):
        return "lora_adapter"
    recorded = provenance.recorded_kind(path)
    if recorded is None:
        try:
            recorded = (checkpoint or Checkpoint(path)).metadata.get(provenance.KIND_KEY)
        except TaskVecError:  # not a checkpoint: the caller's own open says why
            return "model"
    return "task_vector" if recorded == "task_vector" else "model"


def open_source(path: Path) -> DeltaSource:
    if is_adapter(path):
        return AdapterDelta(Adapter(path))
    ckpt = Checkpoint(path)
    return VectorDelta(ckpt) if kind(path, ckpt) == "task_vector" else FullDelta(ckpt)


@dataclass
class Plan:
    """The base every source is checked against."""

    base: Checkpoint
    allow_vocab_mismatch: bool
    vocab_size: int | None

    def rows_covered(self, label: str, name: str, base: TensorInfo, shape) -> int:
        """Rows both sides share; raises on a mismatch that is not an allowed vocabulary one."""
        if tuple(shape) == base.shape:
            return base.rows
        vocab_tensor = (len(shape) == len(base.shape) == 2 and shape[1] == base.shape[1]
                        and (base.rows == self.vocab_size if self.vocab_size
                             else bool(_VOCAB_NAMES.search(name))))
        if vocab_tensor and self.allow_vocab_mismatch:
            return min(base.rows, shape[0])
        if vocab_tensor:
            raise TaskVecError(
                f"{label}: tensor {name}: vocabulary-size mismatch: {shape[0]} rows vs the "
                f"base's {base.rows} (pass --allow-vocab-mismatch to edit the common rows and "
                "keep the base's others)")
        raise TaskVecError(f"{label}: tensor {name}: shape {list(shape)} does not match the "
                           f"base's {list(base.shape)}")


class DeltaSource:
    """One summand. `rows_limit[name]` < base rows only with an allowed vocabulary mismatch."""

    label: str
    checkpoint: Checkpoint  # the file the source reads

    def __init__(self):
        self.rows_limit: dict[str, int] = {}
        self.vocab_mismatch: set[str] = set()

    def check(self, plan: Plan) -> None:
        """Validate against the base from headers; fill rows_limit and vocab_mismatch."""
        raise NotImplementedError

    def _cover(self, plan: Plan, info: TensorInfo, other_name: str, shape) -> None:
        self.rows_limit[info.name] = plan.rows_covered(self.label, other_name, info, shape)
        if tuple(shape) != info.shape:
            self.vocab_mismatch.add(info.name)

    def delta(self, info: TensorInfo, r0: int, r1: int, base_rows: torch.Tensor,
              out: torch.Tensor, raw: bytearray) -> bool:
        """Write the fp32 delta of rows [r0, r1) into `out` (flat, like `base_rows`, the base's
        fp32 rows), reading through the reusable `raw`; False means the delta is zero.
        Called from several threads at once, for different blocks."""
        raise NotImplementedError


def _refuse_missing(holder, other, names) -> None:
    """One line naming the first tensor `holder` has and `other` lacks, and how many more."""
    names = sorted(names)
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise TaskVecError(f"{holder}: tensor {names[0]} is missing from {other}{more}")


class CheckpointDelta(DeltaSource):
    """A full checkpoint read tensor by tensor: a fine-tuned model (delta = t − b) or a
    stored task vector (delta = v). Tensors are matched to the base's by name, tolerating a
    prefix one side lacks (checkpoints of one model saved by different library versions)."""

    subtract_base: bool

    def __init__(self, checkpoint: Checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.label = str(checkpoint.path)
        self.names: dict[str, str] = {}  # base tensor -> this checkpoint's tensor

    def check_dtype(self, name: str, base: TensorInfo, other: TensorInfo) -> None:
        raise NotImplementedError

    def check(self, plan: Plan) -> None:
        base = plan.base
        matched = match_names(self.checkpoint.tensors, base.tensors)
        _refuse_missing(self.label, base.path, [n for n, b in matched.items() if b is None])
        self.names = {b: n for n, b in matched.items()}
        _refuse_missing(base.path, self.label, set(base.tensors) - set(self.names))
        for name, info in base.tensors.items():
            other = self.checkpoint.tensors[self.names[name]]
            self.check_dtype(name, info, other)
            self._cover(plan, info, other.name, other.shape)

    def delta(self, info, r0, r1, base_rows, out, raw):
        if r0 >= self.rows_limit[info.name]:
            return False
        other = self.checkpoint.tensors[self.names[info.name]]
        out.copy_(self.checkpoint.read_rows(other, r0, r1 - r0, raw))
        if self.subtract_base:
            out.sub_(base_rows)
        return True


class FullDelta(CheckpointDelta):
    """A fine-tuned full checkpoint: delta = t − b, in the same dtypes as the base."""

    subtract_base = True

    def check_dtype(self, name, base, other):
        if other.dtype != base.dtype:
            raise TaskVecError(f"{self.label}: tensor {name}: dtype {other.dtype} does not "
                               f"match the base's {base.dtype}")


class VectorDelta(CheckpointDelta):
    """A stored task vector: delta = v (any float dtype; non-float tensors are ignored)."""

    subtract_base = False

    def check_dtype(self, name, base, other):
        if base.dtype in FLOAT_DTYPES and other.dtype not in FLOAT_DTYPES:
            raise TaskVecError(f"{self.label}: tensor {name}: dtype {other.dtype} is not a "
                               "float type")


@dataclass
class _BoundEdit:
    edit: TensorEdit
    transposed: bool = False


class AdapterDelta(DeltaSource):
    """A peft LoRA adapter: delta = (R − b if the adapter replaces the tensor) + s·B·A."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.adapter = adapter
        self.checkpoint = adapter.checkpoint
        self.label = str(adapter.folder)
        self.bound: dict[str, _BoundEdit] = {}
        # (tensor name, (left, right)) of the latest tensor streamed: factors are small, so
        # they are read once per tensor, and only one tensor's are held at a time.
        self._factors: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def check(self, plan: Plan) -> None:
        tensors = self.checkpoint.tensors
        for name, edit in self.adapter.bind(plan.base.tensors).items():
            info = plan.base.tensors[name]
            bound = self.bound[name] = _BoundEdit(edit)
            self.rows_limit[name] = info.rows
            if info.dtype not in FLOAT_DTYPES:
                raise TaskVecError(f"{self.label}: adapter edits {name}, a {info.dtype} tensor")
            if edit.replacement is not None:
                self._cover(plan, info, edit.replacement, tensors[edit.replacement].shape)
            if edit.lora is not None:
                bound.transposed = self.adapter.transposed(edit.lora, info.shape)
                shape = self.adapter.delta_shape(edit.lora, bound.transposed)
                if shape != info.shape:
                    raise TaskVecError(f"{self.label}: module {edit.name}: LoRA delta shape "
                                       f"{list(shape)} does not match the base's "
                                       f"{list(info.shape)}")

    def factors(self, lora: LoraFactors, transposed: bool):
        """fp32 (left, right) with ΔW = left @ right; rows of ΔW are rows of `left`."""
        a = self.checkpoint.read_tensor(lora.a).float()
        b = self.checkpoint.read_tensor(lora.b).float() * lora.scale
        return (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)

    def delta(self, info, r0, r1, base_rows, out, raw):
        bound = self.bound.get(info.name)
        if bound is None or r0 >= self.rows_limit[info.name]:
            return False
        edit = bound.edit
        if edit.replacement is not None:
            replacement = self.checkpoint.tensors[edit.replacement]
            out.copy_(self.checkpoint.read_rows(replacement, r0, r1 - r0, raw))
            out.sub_(base_rows)
        else:
            out.zero_()
        if edit.lora is not None:
            cached = self._factors  # one read of the attribute: other threads may replace it
            if cached is None or cached[0] != info.name:
                cached = self._factors = (info.name, self.factors(edit.lora, bound.transposed))
            left, right = cached[1]
            out.view(r1 - r0, -1).addmm_(left[r0:r1], right)
        return True
