"""The streaming engine: a base checkpoint and delta sources in, safetensors shards out.

Each tensor is cut into blocks of rows. Per block, a worker thread reads the base's rows and
each source's delta into its own fp32 scratch, hands them to the operation's `combine` (a pure
function of tensors: it never sees a file), rounds the result once to the output dtype, checks
it is finite, and writes it at its place in the shard, whose header was written first. Two
workers overlap reading, computing and writing (torch ops, preadv and pwrite release the GIL);
each finished shard is fsynced on another thread while the next one is computed. Memory is
bounded by `buffer_mb` per worker, not by the largest tensor or the model.
"""

from __future__ import annotations

import gc
import math
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from taskvec.errors import TaskVecError
from taskvec.reader import (
    FLOAT_DTYPES,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    as_tensor,
    itemsize,
    torch_dtype,
)
from taskvec.sources import DeltaSource
from taskvec.writer import ShardWriter

# combine(tensor name, base rows, deltas) -> result rows, all flat fp32 of one block; a delta is
# None where that source leaves the block unchanged. It may overwrite its inputs: they are the
# worker's scratch, and every source has read the base rows before it is called.
Combine = Callable[[str, torch.Tensor, list[torch.Tensor | None]], torch.Tensor]
WORKERS = 2  # measured on 2 cores: I/O and arithmetic overlap; more only adds contention


def output_shards(base: Checkpoint, out_dtype: Callable[[TensorInfo], str],
                  max_shard_size: int | None) -> list[tuple[str, list[str]]]:
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


def _square_limit(dtype: str) -> float:
    """A bound on Σx² below which every fp32 x rounds to a finite value of `dtype`, with a
    margin for the rounding of the sum itself (a sum of non-negative terms never falls below
    its largest term by more than one rounding)."""
    finfo = torch.finfo(torch_dtype(dtype))
    overflow = finfo.max + finfo.eps * 2.0 ** (math.frexp(finfo.max)[1] - 2)  # max + ulp/2
    return overflow * overflow * (1 - 2**-20) if overflow < 2**64 else math.inf


class _Scratch:
    """One worker's buffers, reused for every block."""

    def __init__(self, block: int, sources: int, raw_bytes: int, out_bytes: int):
        self.raw = bytearray(raw_bytes)
        self.out = bytearray(out_bytes)
        self.base = torch.empty(block)
        self.deltas = [torch.empty(block) for _ in range(sources)]


class _Stream:
    def __init__(self, base: Checkpoint, sources: Sequence[DeltaSource], combine: Combine,
                 out_dtype, computes, buffer_mb: float):
        self.base, self.sources, self.combine = base, list(sources), combine
        self.out_dtype, self.computes = out_dtype, computes
        self.block = max([max(1, int(buffer_mb * 2**20) // 4)]
                         + [i.row_numel for i in base.tensors.values()])
        self.limits = {dtype: _square_limit(dtype) for dtype in FLOAT_DTYPES}
        # Raw buffers as large as the widest item read or written: a block of fp16 takes 2
        # bytes an element, not 8.
        read = [base, *(s.checkpoint for s in self.sources)]
        self.raw_bytes = self.block * max((itemsize(i.dtype) for c in read
                                           for i in c.tensors.values()), default=1)
        self.out_bytes = self.block * max((itemsize(out_dtype(i)) for i in base.tensors.values()),
                                          default=1)
        self._local = threading.local()

    def blocks(self, info: TensorInfo):
        rows_per_block = max(1, self.block // max(1, info.row_numel))
        limits = [s.rows_limit.get(info.name, info.rows) for s in self.sources]
        return _segments(info.rows, rows_per_block, limits)

    def start_worker(self) -> None:
        # Cache-sized blocks gain nothing from intra-op threads, whose barriers stall badly
        # when the machine is busy (measured 2–20× slower): one thread per worker.
        torch.set_num_threads(1)
        self._local.scratch = _Scratch(self.block, len(self.sources), self.raw_bytes,
                                       self.out_bytes)

    def run_block(self, writer: ShardWriter, info: TensorInfo, r0: int, r1: int) -> int:
        """Compute and write rows [r0, r1) of one tensor; returns the bytes written."""
        scratch: _Scratch = self._local.scratch
        dtype = self.out_dtype(info)
        n = (r1 - r0) * info.row_numel
        nbytes, offset = n * itemsize(dtype), r0 * info.row_numel * itemsize(dtype)
        if not self.computes(info):  # copied byte for byte (integer buffers, untouched tensors)
            writer.write(info.name, offset, self.base.read_into(info, r0, r1 - r0, scratch.raw))
            return nbytes
        base_rows = scratch.base[:n]
        base_rows.copy_(self.base.read_rows(info, r0, r1 - r0, scratch.raw))
        deltas = [delta[:n] if source.delta(info, r0, r1, base_rows, delta[:n], scratch.raw)
                  else None for source, delta in zip(self.sources, scratch.deltas, strict=True)]
        result = self.combine(info.name, base_rows, deltas)
        out_bytes = memoryview(scratch.out)[:nbytes]
        out = as_tensor(out_bytes, dtype)
        out.copy_(result)
        # One cheap pass instead of isfinite(): NaN/Inf propagate into Σx², and Σx² below the
        # limit bounds every |x| below the dtype's overflow. Only otherwise (possibly an
        # overflow of the sum itself) is the exact test of the rounded values needed.
        if not float(torch.dot(result, result)) < self.limits[dtype] and not out.isfinite().all():
            raise TaskVecError(self._non_finite_message(info, r0, r1, dtype))
        writer.write(info.name, offset, out_bytes)
        return nbytes

    def _non_finite_message(self, info: TensorInfo, r0: int, r1: int, dtype: str) -> str:
        rows = self.base.read_rows(info, r0, r1 - r0, bytearray(self.raw_bytes))
        if not rows.isfinite().all():
            cause = f"the base {info.path} holds NaN/Inf"
        else:
            labels = ", ".join(s.label for s in self.sources)
            cause = (f"a non-finite value in {labels}, or an overflow of {dtype}" if labels
                     else f"an overflow of {dtype}")
        return f"{info.path.parent}: tensor {info.name}: NaN/Inf produced ({cause})"


def stream(base: Checkpoint, sources: Sequence[DeltaSource], combine: Combine, folder: Path,
           shards: list[tuple[str, list[str]]], *, out_dtype: Callable[[TensorInfo], str],
           computes: Callable[[TensorInfo], bool] | None = None,
           buffer_mb: float, label: str = "taskvec", metadata: dict | None = None) -> int:
    """Write `shards` into `folder`: each tensor `computes` selects (default: the float ones)
    as combine(base rows, source deltas) rounded to out_dtype, the others copied from the base;
    each shard's metadata is the base's updated with `metadata`. Returns the bytes of tensor
    data written. A progress bar shows on a terminal only."""
    computes = computes or (lambda info: info.dtype in FLOAT_DTYPES)
    work = _Stream(base, sources, combine, out_dtype, computes, buffer_mb)
    total = sum(base.tensors[n].numel * itemsize(out_dtype(base.tensors[n]))
                for _, names in shards for n in names)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    pool = ThreadPoolExecutor(WORKERS, "taskvec-worker", initializer=work.start_worker)
    syncer = ThreadPoolExecutor(1, "taskvec-fsync")
    writers: list[ShardWriter] = []
    syncs: list[Future] = []
    pending: deque[tuple[Future | None, ShardWriter, str]] = deque()

    def settle_oldest() -> None:
        future, writer, shard = pending.popleft()
        if future is not None:
            bar.update(future.result())  # re-raises a failed block (bad value, disk full) here
            return
        bar.set_postfix(shard=shard, refresh=False)  # the shard's last block is written
        syncs.append(syncer.submit(writer.finish))

    # The loop allocates only views and small objects: the cyclic GC would just rescan.
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    gc.disable()
    try:
        metadata = {**base.metadata, "format": "pt", **(metadata or {})}
        for shard_name, names in shards:
            writer = ShardWriter(folder / shard_name, [
                (n, out_dtype(base.tensors[n]), base.tensors[n].shape) for n in names], metadata)
            writers.append(writer)
            for name in names:
                info = base.tensors[name]
                for r0, r1 in work.blocks(info):
                    pending.append((pool.submit(work.run_block, writer, info, r0, r1), writer,
                                    shard_name))
                    while len(pending) > 2 * WORKERS:
                        settle_oldest()
            pending.append((None, writer, shard_name))
        while pending:
            settle_oldest()
        for sync in syncs:
            sync.result()
    except BaseException:
        for future, _, _ in pending:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=True)
        syncer.shutdown(wait=True)
        for writer in writers:
            writer.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        syncer.shutdown(wait=True)
        bar.close()
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()
    return total
