"""The public operations: diff, apply, negate, and negation of an adapter.

Each is a `combine` (the per-block math, a pure function of fp32 tensors) plus a record of what
it did; `stream_operation` does the rest for all of them: resolve and check the inputs from
headers, stream through the engine into an atomic output folder, copy the model files, write
taskvec.json. A new operation (TIES, DARE, a per-layer λ) is a new combine, for example

    def per_layer(scales):                       # O = B + λ(layer)·V
        def combine(name, base, deltas):
            return deltas[0].mul_(scales.get(layer_of(name), 1.0)).add_(base)
        return combine
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from taskvec import provenance
from taskvec.adapter import Adapter
from taskvec.errors import TaskVecError
from taskvec.reader import DTYPE_NAMES, FLOAT_DTYPES, Checkpoint, TensorInfo, dtype_name, vocab_size
from taskvec.resolve import resolve
from taskvec.sources import Plan, open_source
from taskvec.writer import OutputDir, copy_files, write_index

MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
VECTOR_FILES = ("config.json",)
ADAPTER_FILES = ("adapter_config.json", "README.md")
DEFAULT_BUFFER_MB = 2.0  # measured: 0.5–2 MB blocks stay in cache and run fastest


# ---------------------------------------------------------------------------------------------
# The math, one block of rows at a time


def weighted_sum(scales: Sequence[float], add_base: bool):
    """[B +] Σ sᵢ·Δᵢ in fp32, term by term in the order given (the roundings of the formula)."""
    def combine(name, base, deltas):
        result = None
        for scale, delta in zip(scales, deltas, strict=True):
            if delta is None:
                continue
            if scale != 1.0:
                delta.mul_(scale)
            if result is None:
                result = delta.add_(base) if add_base else delta  # b + d, exact in either order
            else:
                result.add_(delta)
        if result is None:
            return base if add_base else base.new_zeros(base.shape)
        return result
    return combine


def scaled(factor: float):
    """x·factor: the B factors of a negated adapter."""
    return lambda name, base, deltas: base.mul_(factor)


# ---------------------------------------------------------------------------------------------
# Plumbing shared by every operation


def parse_size(size: int | str | None) -> int | None:
    """'1GB', '500MB', '2MiB', 1000000 -> bytes (at least 1)."""
    if size is None:
        return None
    match = None if isinstance(size, int) else re.fullmatch(
        r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif match:
        unit = 1024 if match[3] == "IB" else 1000
        value = int(float(match[1]) * unit ** " KMGT".index(match[2] or " "))
    else:
        value = 0
    if value < 1:
        raise TaskVecError(f"max shard size {size!r}: expected a number of bytes like 1GB or 500MB")
    return value


MAX_BUFFER_MB = 4096.0  # per worker; the engine holds a few such blocks each


def check_number(value, what: str, *, positive: bool = False, at_most: float = math.inf):
    """A setting that must be a finite float (and > 0, and ≤ at_most): refused before any work."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (positive and number <= 0) or abs(number) > at_most:
        bounds = " > 0" if positive else ""
        bounds += f" and at most {at_most:g}" if at_most < math.inf else ""
        raise TaskVecError(f"{what} {value!r}: expected a finite number{bounds}")
    return number


def refuse_overlap(out: Path, inputs: Sequence[Path]) -> None:
    """An output must not be, contain, or sit inside an input, even with --force."""
    out = out.resolve()
    for path in inputs:
        folder = path.resolve() if path.is_dir() else path.resolve().parent
        if out == folder or folder in out.parents or out in folder.parents:
            raise TaskVecError(f"{out}: output overlaps the input {path}; choose another --out")


def stream_operation(operation: str, kind: str, base_arg, inputs: Sequence[tuple[object, str]],
                     combine, out, *, record: dict, dtype: str | None = None,
                     force: bool = False, max_shard_size=None, allow_vocab_mismatch: bool = False,
                     buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write `kind` ("model" or "task_vector") to `out`: every float tensor of the base is
    combine(base rows, [delta of each input]); `inputs` are (path or id, role for messages)."""
    buffer_mb = check_number(buffer_mb, "buffer size (MB)", positive=True, at_most=MAX_BUFFER_MB)
    shards_limit = parse_size(max_shard_size)
    base_path = resolve(base_arg, "base")
    paths = [resolve(arg, role) for arg, role in inputs]
    refuse_overlap(Path(out), [base_path, *paths])
    base = Checkpoint(base_path)
    sources = [open_source(path) for path in paths]
    try:
        unsupported = next((i for i in base.tensors.values() if i.dtype.startswith("F8")), None)
        if unsupported:
            raise TaskVecError(f"{unsupported.path}: tensor {unsupported.name}: "
                               f"{unsupported.dtype} arithmetic is not supported")
        plan = Plan(base, allow_vocab_mismatch, vocab_size(base.folder))
        for source in sources:  # the whole plan is checked before anything is written
            source.check(plan)
        code = DTYPE_NAMES[dtype] if dtype else None

        def out_dtype(info: TensorInfo) -> str:
            return code if code and info.dtype in FLOAT_DTYPES else info.dtype

        # Imported only now: bad input is refused above without paying for torch (~1 s).
        from taskvec import engine

        shards = engine.output_shards(base, out_dtype, shards_limit)
        mismatched = sorted(set().union(*(s.vocab_mismatch for s in sources)))
        with OutputDir(Path(out), force) as folder:
            total = engine.stream(base, sources, combine, folder, shards, out_dtype=out_dtype,
                                  buffer_mb=buffer_mb, label=operation,
                                  metadata={provenance.KIND_KEY: kind})
            if len(shards) > 1 or base.indexed:
                write_index(folder, {n: shard for shard, names in shards for n in names}, total)
            copy_files(base.folder, folder, MODEL_FILES if kind == "model" else VECTOR_FILES)
            dtypes = {dtype_name(out_dtype(i)) for i in base.tensors.values()
                      if i.dtype in FLOAT_DTYPES}
            provenance.write(folder, kind, operation, base=str(base_arg), **record,
                             dtype=",".join(sorted(dtypes)), vocab_mismatch=mismatched)
    finally:
        base.close()
        for source in sources:
            source.checkpoint.close()
    return Path(out)


# ---------------------------------------------------------------------------------------------
# The operations


def diff(base, tuned, out, *, dtype: str | None = None, force: bool = False,
         max_shard_size=None, allow_vocab_mismatch: bool = False,
         buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write the task vector V = T − B (T a full checkpoint or a LoRA adapter)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise TaskVecError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return stream_operation(
        "diff", "task_vector", base, [(tuned, "tuned")], weighted_sum([1.0], add_base=False),
        out, record={"tuned": str(tuned), "scale": 1.0}, dtype=dtype, force=force,
        max_shard_size=max_shard_size, allow_vocab_mismatch=allow_vocab_mismatch,
        buffer_mb=buffer_mb)


def apply(base, vectors, out, *, scales: Sequence[float] | None = None, force: bool = False,
          max_shard_size=None, allow_vocab_mismatch: bool = False,
          buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write O = B + Σ Sᵢ·Vᵢ (task vectors or LoRA adapters; scales default to 1)."""
    vectors = [vectors] if isinstance(vectors, (str, Path)) else list(vectors)
    scales = [1.0] * len(vectors) if scales is None else [check_number(s, "scale")
                                                          for s in scales]
    if len(scales) == 1 and len(vectors) > 1:
        scales = scales * len(vectors)
    if len(scales) != len(vectors) or not vectors:
        raise TaskVecError(f"{len(vectors)} vectors but {len(scales)} scales: give one scale, "
                           "or one per vector")
    return stream_operation(
        "apply", "model", base, [(v, "vector") for v in vectors],
        weighted_sum(scales, add_base=True), out,
        record={"vectors": [str(v) for v in vectors], "scales": scales}, force=force,
        max_shard_size=max_shard_size, allow_vocab_mismatch=allow_vocab_mismatch,
        buffer_mb=buffer_mb)


def negate(base, tuned, out, *, scale: float = 1.0, force: bool = False, max_shard_size=None,
           allow_vocab_mismatch: bool = False, buffer_mb: float = DEFAULT_BUFFER_MB) -> Path:
    """Write O = B − L·(T − B) without writing the vector (SKU stage 2 with L = λ)."""
    scale = check_number(scale, "scale")
    return stream_operation(
        "negate", "model", base, [(tuned, "tuned")],
        weighted_sum([-float(scale)], add_base=True), out,
        record={"tuned": str(tuned), "scale": float(scale)}, force=force,
        max_shard_size=max_shard_size, allow_vocab_mismatch=allow_vocab_mismatch,
        buffer_mb=buffer_mb)


def negate_adapter(adapter, out, *, scale: float = 1.0, force: bool = False) -> Path:
    """Write a LoRA adapter whose merge gives B − L·ΔW: B factors scaled by −L (A untouched)."""
    scale = check_number(scale, "scale")
    adapter_path = resolve(adapter, "adapter")
    refuse_overlap(Path(out), [adapter_path])
    source = Adapter(adapter_path)
    try:
        replaced = [e.replacement for e in source.edits.values()
                    if e.replacement is not None and ".base_layer." not in e.replacement]
        if replaced:
            raise TaskVecError(
                f"{source.folder}: tensor {replaced[0]} is a full replacement (modules_to_save): "
                "negating it needs the base; use `taskvec negate --base B --tuned ADAPTER`")
        b_factors = {e.lora.b for e in source.edits.values() if e.lora is not None}
        ckpt = source.checkpoint
        from taskvec import engine  # torch only once the input is known to be good

        # The engine checks the B factors it scales; A factors are copied, so check them here
        # (all of an adapter's tensors are small).
        for name, tensor in ckpt.tensors.items():
            if tensor.dtype in FLOAT_DTYPES and not ckpt.read_tensor(name).isfinite().all():
                raise TaskVecError(f"{ckpt.path}: tensor {name}: holds NaN/Inf")

        with OutputDir(Path(out), force) as folder:
            engine.stream(ckpt, [], scaled(-float(scale)), folder,
                          [(ckpt.path.name, next(iter(ckpt.shards.values())))],
                          out_dtype=lambda info: info.dtype,
                          computes=lambda info: info.name in b_factors, buffer_mb=DEFAULT_BUFFER_MB,
                          label="negate")
            copy_files(source.folder, folder, ADAPTER_FILES)
            provenance.write(folder, "lora_adapter", "negate_adapter", tuned=str(adapter),
                             scale=float(scale))
    finally:
        source.checkpoint.close()
    return Path(out)
