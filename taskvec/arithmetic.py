"""Task arithmetic streamed tensor by tensor: diff, apply, negate, and adapter negation.

Every output tensor is `base + Σ scaleᵢ·deltaᵢ` (or a single delta, for `diff`), where a delta
comes from a full tuned checkpoint (t − b), a stored task vector (v), or a LoRA adapter
((R − b) + s·B·A). The plan is made from headers alone and checked completely before the
first byte is computed. Then each tensor is processed in blocks of rows: explicit reads into
reused buffers, fp32 arithmetic in preallocated scratch, one rounding to the output dtype,
and sequential writes behind a header written first. Memory is bounded by `buffer_mb`, not by
the largest tensor or the model.
"""

from __future__ import annotations

import datetime
import gc
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from taskvec.adapter import Adapter, TensorEdit, is_adapter, match_names
from taskvec.errors import TaskVecError
from taskvec.reader import (
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    as_tensor,
    itemsize,
)
from taskvec.resolve import resolve
from taskvec.writer import CheckpointWriter, OutputDir, copy_files, write_index, write_json

PROVENANCE_NAME = "taskvec.json"
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
VECTOR_FILES = ("config.json",)
DEFAULT_BUFFER_MB = 2.0  # measured: 0.5–2 MB blocks stay in cache and run fastest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sku-unlearn")
    except PackageNotFoundError:
        return "unknown"


def parse_size(size: int | str | None) -> int | None:
    """'1GB', '500MB', '2MiB', 1000000 -> bytes."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", size.upper())
    if not match:
        raise TaskVecError(f"max shard size {size!r}: expected a number of bytes like 1GB or 500MB")
    unit = 1024 if match[3] == "IB" else 1000
    return int(float(match[1]) * unit ** " KMGT".index(match[2] or " "))


# ---------------------------------------------------------------------------------------------
# Sources of deltas


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
        fp32 rows), reading through the reusable `raw`; False means the delta is zero."""
        raise NotImplementedError


_VOCAB_NAMES = re.compile(r"embed|lm_head|wte|word_embeddings|output\.weight$")


def vocab_size(folder: Path) -> int | None:
    """The base's vocabulary size from its config.json (None when unknown)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


@dataclass
class Plan:
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


def _read_fp32(ckpt: Checkpoint, info: TensorInfo, r0: int, r1: int, raw: bytearray,
               out: torch.Tensor) -> None:
    out.copy_(as_tensor(ckpt.read_into(info, r0, r1 - r0, raw), info.dtype))


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
        _read_fp32(self.checkpoint, self.checkpoint.tensors[self.names[info.name]], r0, r1,
                   raw, out)
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
        # (tensor name, (left, right)) of the tensor being streamed: factors are small, so
        # they are read once per tensor, and only one tensor's are held at a time.
        self._factors: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def check(self, plan: Plan) -> None:
        tensors = self.adapter.checkpoint.tensors
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

    def delta(self, info, r0, r1, base_rows, out, raw):
        bound = self.bound.get(info.name)
        if bound is None or r0 >= self.rows_limit[info.name]:
            return False
        edit = bound.edit
        if edit.replacement is not None:
            replacement = self.adapter.checkpoint.tensors[edit.replacement]
            _read_fp32(self.adapter.checkpoint, replacement, r0, r1, raw, out)
            out.sub_(base_rows)
        else:
            out.zero_()
        if edit.lora is not None:
            if self._factors is None or self._factors[0] != info.name:
                self._factors = (info.name, self.adapter.factors(edit.lora, bound.transposed))
            left, right = self._factors[1]
            out.view(r1 - r0, -1).addmm_(left[r0:r1], right)
        return True


def kind(path: Path) -> str:
    """"lora_adapter", "task_vector" (written by `diff`, per its taskvec.json) or "model"."""
    path = Path(path)
    if is_adapter(path):
        return "lora_adapter"
    provenance = (path if path.is_dir() else path.parent) / PROVENANCE_NAME
    try:
        recorded = json.loads(provenance.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return "task_vector" if recorded == "task_vector" else "model"


def _open_source(path: Path) -> DeltaSource:
    source_kind = kind(path)
    if source_kind == "lora_adapter":
        return AdapterDelta(Adapter(path))
    ckpt = Checkpoint(path)
    return VectorDelta(ckpt) if source_kind == "task_vector" else FullDelta(ckpt)


# ---------------------------------------------------------------------------------------------
# The streaming engine


@dataclass
class Term:
    scale: float
    source: DeltaSource


def _output_shards(base: Checkpoint, out_dtype, max_shard_size: int | None):
    """[(file name, tensor names in write order)]: like the base, or re-split by size."""
    if max_shard_size is None:
        if len(base.shards) == 1 and not base.indexed:
            return [(SINGLE_NAME, next(iter(base.shards.values())))]
        return list(base.shards.items())
    groups: list[list[str]] = [[]]
    size = 0
    for names in base.shards.values():
        for name in names:
            nbytes = base.tensors[name].numel * itemsize(out_dtype(base.tensors[name]))
            if groups[-1] and size + nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
    if len(groups) == 1:
        return [(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _segments(rows: int, rows_per_block: int, limits):
    """Row blocks that never straddle a vocabulary boundary."""
    stops = sorted({rows} | {limit for limit in limits if 0 < limit < rows})
    r0 = 0
    for stop in stops:
        while r0 < stop:
            r1 = min(r0 + rows_per_block, stop)
            yield r0, r1
            r0 = r1


def _non_finite_message(info: TensorInfo, terms: Sequence[Term], base_rows, dtype) -> str:
    if not torch.isfinite(base_rows).all():
        cause = f"the base {info.path} holds NaN/Inf"
    else:
        sources = ", ".join(t.source.label for t in terms)
        cause = f"a non-finite value in {sources}, or an overflow of {dtype}"
    return f"{info.path.parent}: tensor {info.name}: NaN/Inf produced ({cause})"


def _all_finite(values: torch.Tensor) -> bool:
    # A sum is ~30x cheaper than isfinite(): NaN/Inf propagate into it; only when it is not
    # finite (possibly an overflow of the sum itself) is the exact test needed.
    return bool(torch.isfinite(values.sum(dtype=torch.float32))) or bool(
        torch.isfinite(values).all())


def _stream(base: Checkpoint, terms: Sequence[Term], folder: Path, *, add_base: bool,
            out_dtype, max_shard_size: int | None, buffer_mb: float) -> None:
    block = max(1, int(buffer_mb * 2**20) // 4)  # elements per block (fp32 scratch)
    block = max([block] + [i.row_numel for i in base.tensors.values()])
    base32, delta32, acc32 = torch.empty(block), torch.empty(block), torch.empty(block)
    raw_in = bytearray(block * 8)
    metadata = {**base.metadata, "format": "pt"}
    shards = _output_shards(base, out_dtype, max_shard_size)
    weight_map, total = {}, 0
    writer = CheckpointWriter(folder, block * 8)
    # Cache-sized elementwise blocks gain nothing from intra-op threads, and their barriers
    # stall badly when the machine is busy (measured 2-20x slower); the second core serves the
    # writer thread instead. The loop allocates only views: the cyclic GC would just rescan.
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    torch.set_num_threads(1)
    gc.disable()
    try:
        for shard_name, names in shards:
            writer.begin_shard(shard_name, [(n, out_dtype(base.tensors[n]), base.tensors[n].shape)
                                            for n in names], metadata)
            for name in names:
                info = base.tensors[name]
                dtype = out_dtype(info)
                rows_per_block = max(1, block // max(1, info.row_numel))
                limits = [t.source.rows_limit.get(name, info.rows) for t in terms]
                for r0, r1 in _segments(info.rows, rows_per_block, limits):
                    n = (r1 - r0) * info.row_numel
                    out_bytes = writer.buffer(n * itemsize(dtype))
                    if info.dtype not in FLOAT_DTYPES:  # integer buffers pass through
                        writer.write(base.read_into(info, r0, r1 - r0, out_bytes))
                        continue
                    base_rows, delta, acc = base32[:n], delta32[:n], acc32[:n]
                    _read_fp32(base, info, r0, r1, raw_in, base_rows)
                    result = acc.copy_(base_rows) if add_base else None
                    for term in terms:
                        if not term.source.delta(info, r0, r1, base_rows, delta, raw_in):
                            continue
                        if term.scale != 1.0:
                            delta.mul_(term.scale)
                        result = acc.copy_(delta) if result is None else result.add_(delta)
                    if result is None:
                        result = acc.zero_()
                    out = as_tensor(out_bytes, dtype)
                    out.copy_(result)
                    if not _all_finite(out):
                        raise TaskVecError(_non_finite_message(info, terms, base_rows, dtype))
                    writer.write(out_bytes)
                weight_map[name] = shard_name
                total += info.numel * itemsize(dtype)
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()
    writer.close()
    if len(shards) > 1 or base.indexed:
        write_index(folder, weight_map, total)


# ---------------------------------------------------------------------------------------------
# Public operations


def refuse_overlap(out: Path, inputs: Sequence[Path]) -> None:
    """An output must not be, contain, or sit inside an input, even with --force."""
    out = out.resolve()
    for path in inputs:
        folder = path.resolve() if path.is_dir() else path.resolve().parent
        if out == folder or folder in out.parents or out in folder.parents:
            raise TaskVecError(f"{out}: output overlaps the input {path}; choose another --out")


def _write_checkpoint(operation: str, kind: str, base_arg, terms_args, out, *, add_base: bool,
                      dtype: str | None, force: bool, max_shard_size, allow_vocab_mismatch: bool,
                      buffer_mb: float, record: dict) -> Path:
    base_path = resolve(base_arg, "base")
    paths = [resolve(arg, role) for arg, _, role in terms_args]
    refuse_overlap(Path(out), [base_path, *paths])
    base = Checkpoint(base_path)
    terms = [Term(scale, _open_source(path)) for (_, scale, _), path in
             zip(terms_args, paths, strict=True)]
    try:
        unsupported = next((i for i in base.tensors.values() if i.dtype.startswith("F8")), None)
        if unsupported:
            raise TaskVecError(f"{unsupported.path}: tensor {unsupported.name}: "
                               f"{unsupported.dtype} arithmetic is not supported")
        plan = Plan(base, allow_vocab_mismatch, vocab_size(base.folder))
        for term in terms:  # the whole plan is checked before anything is written
            term.source.check(plan)
        code = DTYPE_NAMES[dtype] if dtype else None

        def out_dtype(info: TensorInfo) -> str:
            return code if code and info.dtype in FLOAT_DTYPES else info.dtype

        mismatched = sorted(set().union(*(t.source.vocab_mismatch for t in terms)))
        with OutputDir(Path(out), force) as folder:
            _stream(base, terms, folder, add_base=add_base, out_dtype=out_dtype,
                    max_shard_size=parse_size(max_shard_size), buffer_mb=buffer_mb)
            copy_files(base.folder, folder, MODEL_FILES if kind == "model" else VECTOR_FILES)
            dtypes = {str(DTYPES[out_dtype(i)]).removeprefix("torch.")
                      for i in base.tensors.values() if i.dtype in FLOAT_DTYPES}
            write_json(folder / PROVENANCE_NAME, {
                "format": "taskvec", "taskvec_version": _version(), "kind": kind,
                "operation": operation, "base": str(base_arg), **record,
                "dtype": ",".join(sorted(dtypes)), "vocab_mismatch": mismatched,
                "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
            })
    finally:
        base.close()
        for term in terms:
            term.source.checkpoint.close()
    return Path(out)


def diff(base, tuned, out, *, dtype: str | None = None, force: bool = False,
         max_shard_size=None, allow_vocab_mismatch: bool = False,
         buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write the task vector V = T − B (T a full checkpoint or a LoRA adapter)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise TaskVecError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return _write_checkpoint(
        "diff", "task_vector", base, [(tuned, 1.0, "tuned")], out, add_base=False, dtype=dtype,
        force=force, max_shard_size=max_shard_size, allow_vocab_mismatch=allow_vocab_mismatch,
        buffer_mb=buffer_mb, record={"tuned": str(tuned), "scale": 1.0})


def apply(base, vectors, out, *, scales: Sequence[float] | None = None, force: bool = False,
          max_shard_size=None, allow_vocab_mismatch: bool = False,
          buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write O = B + Σ Sᵢ·Vᵢ (task vectors or LoRA adapters; scales default to 1)."""
    vectors = [vectors] if isinstance(vectors, (str, Path)) else list(vectors)
    scales = [1.0] * len(vectors) if scales is None else [float(s) for s in scales]
    if len(scales) == 1 and len(vectors) > 1:
        scales = scales * len(vectors)
    if len(scales) != len(vectors) or not vectors:
        raise TaskVecError(f"{len(vectors)} vectors but {len(scales)} scales: give one scale, "
                           "or one per vector")
    terms = [(v, s, "vector") for v, s in zip(vectors, scales, strict=True)]
    return _write_checkpoint(
        "apply", "model", base, terms, out,
        add_base=True, dtype=None, force=force, max_shard_size=max_shard_size,
        allow_vocab_mismatch=allow_vocab_mismatch, buffer_mb=buffer_mb,
        record={"vectors": [str(v) for v in vectors], "scales": scales})


def negate(base, tuned, out, *, scale: float = 1.0, force: bool = False, max_shard_size=None,
           allow_vocab_mismatch: bool = False, buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write O = B − L·(T − B) without writing the vector (SKU stage 2 with L = λ)."""
    return _write_checkpoint(
        "negate", "model", base, [(tuned, -float(scale), "tuned")], out, add_base=True,
        dtype=None, force=force, max_shard_size=max_shard_size,
        allow_vocab_mismatch=allow_vocab_mismatch, buffer_mb=buffer_mb,
        record={"tuned": str(tuned), "scale": float(scale)})


def negate_adapter(adapter, out, *, scale: float = 1.0, force: bool = False) -> Path:
    """Write a LoRA adapter whose merge gives B − L·ΔW: B factors scaled by −L (A untouched)."""
    from safetensors.torch import save_file

    adapter_path = resolve(adapter, "adapter")
    refuse_overlap(Path(out), [adapter_path])
    source = Adapter(adapter_path)
    replaced = [e.replacement for e in source.edits.values()
                if e.replacement is not None and ".base_layer." not in e.replacement]
    if replaced:
        raise TaskVecError(
            f"{source.folder}: tensor {replaced[0]} is a full replacement (modules_to_save): "
            "negating it needs the base; use `taskvec negate --base B --tuned ADAPTER`")
    b_factors = {e.lora.b for e in source.edits.values() if e.lora is not None}
    tensors = {}
    for name in source.checkpoint.tensors:  # adapters are small: read whole tensors
        tensor = source.checkpoint.read_tensor(name)
        if name in b_factors:
            tensor = (tensor.float() * -float(scale)).to(tensor.dtype)
        tensors[name] = tensor
    source.checkpoint.close()
    with OutputDir(Path(out), force) as folder:
        save_file(tensors, folder / "adapter_model.safetensors",
                  metadata={**source.checkpoint.metadata, "format": "pt"})
        copy_files(source.folder, folder, ("adapter_config.json", "README.md"))
        write_json(folder / PROVENANCE_NAME, {
            "format": "taskvec", "taskvec_version": _version(), "kind": "lora_adapter",
            "operation": "negate_adapter", "tuned": str(adapter), "scale": float(scale),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
        })
    return Path(out)
