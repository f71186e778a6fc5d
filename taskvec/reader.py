"""Safetensors checkpoints described from their headers, read with explicit reads.

This module only knows files: it parses and validates headers and index files and reads byte
ranges into caller-owned buffers. It never maps a file (mmap would count every touched page in
the process's RSS) and never holds a whole tensor. torch is imported only when bytes become a
tensor, so that refusing bad input does not pay for it.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from taskvec import jsonfile
from taskvec.errors import TaskVecError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype code -> (torch dtype name, item size)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
# Dtypes we do arithmetic on; everything else passes through from the base unchanged.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][1]


def dtype_name(dtype: str) -> str:
    """'F16' -> 'float16'."""
    return DTYPES[dtype][0]


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[dtype][0])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path  # the shard that holds it
    offset: int  # absolute byte offset of its data in that file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        """Leading dimension: the unit in which large tensors are streamed."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def read_header(path: Path) -> tuple[dict, list[TensorInfo]]:
    """Read one safetensors file's header and check it (see parse_header)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as e:
        raise TaskVecError(f"{path}: cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise TaskVecError(f"{path}: not a regular file")
            size = status.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TaskVecError(f"{path}: truncated: shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise TaskVecError(
                    f"{path}: header length {header_len} bytes runs past the end of the file "
                    f"({size} bytes): truncated or not a safetensors file"
                )
            if header_len > jsonfile.MAX_BYTES:
                raise TaskVecError(f"{path}: header of {header_len} bytes is larger than "
                                   f"safetensors allows ({jsonfile.MAX_BYTES})")
            raw = f.read(header_len)
        except OSError as e:
            raise TaskVecError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_header(raw, size, path)


def parse_header(raw: bytes, file_size: int, path: Path) -> tuple[dict, list[TensorInfo]]:
    """The header JSON `raw` of a file of `file_size` bytes: (metadata, tensors in offset
    order). Checked as safetensors itself checks it, so that every read path refuses what it
    refuses: entries of the right types, each tensor named once, offsets that match its shape
    and dtype and tile the data region exactly (no overlap, hole or trailing byte)."""
    header = jsonfile.mapping(jsonfile.parse(raw, f"{path}: safetensors header"),
                              f"{path}: safetensors header")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TaskVecError(f"{path}: __metadata__ must map names to strings")
    data_start = 8 + len(raw)
    tensors = []
    for name, entry in header.items():
        where = f"{path}: tensor {name}:"
        entry = jsonfile.mapping(entry, f"{where} its header entry")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise TaskVecError(f"{where} unknown dtype {dtype!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise TaskVecError(f"{where} shape must be a list and data_offsets a pair, "
                               f"not {shape!r} and {offsets!r}")
        shape = tuple(jsonfile.integer(d, f"{where} each dimension") for d in shape)
        begin, end = (jsonfile.integer(o, f"{where} each data offset") for o in offsets)
        info = TensorInfo(name, dtype, shape, path, data_start + begin)
        if end - begin != info.nbytes:
            raise TaskVecError(
                f"{where} data_offsets [{begin}, {end}] do not match "
                f"shape {list(shape)} of {dtype} ({info.nbytes} bytes)"
            )
        if data_start + end > file_size:
            raise TaskVecError(f"{path}: truncated: tensor {name} ends at byte "
                               f"{data_start + end} but the file has {file_size} bytes")
        tensors.append(info)
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    expected = data_start
    for t in tensors:
        if t.offset != expected:
            what = "overlaps the previous tensor" if t.offset < expected else "leaves a hole"
            raise TaskVecError(f"{path}: tensor {t.name}: data offset {t.offset - data_start} "
                               f"{what} (expected {expected - data_start})")
        expected += t.nbytes
    if file_size != expected:
        raise TaskVecError(f"{path}: {file_size - expected} trailing bytes after the last tensor")
    return metadata, tensors


def parse_index(index, path: Path) -> dict[str, str]:
    """An index file's parsed JSON -> its weight_map (tensor -> shard file in the folder)."""
    index = jsonfile.mapping(index, f"{path}: the index")
    weight_map = jsonfile.mapping(index.get("weight_map"), f"{path}: weight_map")
    for name, shard in weight_map.items():
        shard = jsonfile.string(shard, f"{path}: tensor {name}: its shard")
        if shard in ("", ".", "..") or "/" in shard or os.sep in shard:
            raise TaskVecError(f"{path}: tensor {name}: shard {shard!r} is not a file name "
                               "in the checkpoint's folder")
    return weight_map


def vocab_size(folder: Path) -> int | None:
    """A model's vocabulary size from its config.json (None when unknown)."""
    path = Path(folder) / "config.json"
    try:
        config = jsonfile.load(path) if path.is_file() else None
    except TaskVecError:  # only a hint for messages about vocabulary tensors
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    size = config.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


class Checkpoint:
    """A safetensors checkpoint (one file, or shards behind an index), from headers only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        # shard file name -> tensor names in offset order, in the order the shards are listed
        self.shards: dict[str, list[str]] = {}
        self.indexed = False
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # the engine reads from several threads
        self._open()

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def _open(self) -> None:
        if self.path.is_file():
            self._add_shard(self.path)
            return
        if not self.path.is_dir():
            what = ("not a regular file or folder" if self.path.exists()
                    else "no such file or folder")
            raise TaskVecError(f"{self.path}: {what}")
        index = self.path / INDEX_NAME
        if index.is_file():
            self._open_index(index)
            return
        files = sorted(self.path.glob("*.safetensors"))
        if (self.path / SINGLE_NAME).is_file():
            files = [self.path / SINGLE_NAME]
        if len(files) != 1:
            found = ", ".join(p.name for p in self.path.iterdir() if p.suffix in {".bin", ".pt"})
            hint = f" (found {found}: convert it to safetensors first)" if found else ""
            what = "no" if not files else "several unindexed"
            raise TaskVecError(f"{self.path}: {what} safetensors files and no {INDEX_NAME}{hint}")
        self._add_shard(files[0])

    def _open_index(self, index: Path) -> None:
        weight_map = parse_index(jsonfile.load(index), index)
        self.indexed = True
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise TaskVecError(f"{index}: missing shard {shard} referenced by the index")
            self._add_shard(shard_path)
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.path.name != shard:
                raise TaskVecError(f"{index}: tensor {name} is not in its shard {shard}")
        unindexed = set(self.tensors) - set(weight_map)
        if unindexed:
            name = sorted(unindexed)[0]
            raise TaskVecError(
                f"{index}: tensor {name} in shard {self.tensors[name].path.name} "
                f"is missing from the index ({len(unindexed)} such tensors)"
            )

    def _add_shard(self, path: Path) -> None:
        metadata, tensors = read_header(path)
        self.metadata.update(metadata)
        names = []
        for info in tensors:
            if info.name in self.tensors:
                raise TaskVecError(f"{path}: tensor {info.name} also appears in another shard")
            self.tensors[info.name] = info
            names.append(info.name)
        self.shards[path.name] = names

    def read_into(self, info: TensorInfo, first_row: int, n_rows: int, buffer) -> memoryview:
        """Read rows [first_row, first_row + n_rows) of a tensor into `buffer`; return the view."""
        row_bytes = info.row_numel * itemsize(info.dtype)
        view = memoryview(buffer)[: n_rows * row_bytes]
        with self._fds_lock:
            fd = self._fds.get(info.path)
            if fd is None:
                fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        offset, done = info.offset + first_row * row_bytes, 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:  # preadv names no file
                raise OSError(e.errno, e.strerror, str(info.path)) from None
            if n == 0:
                raise TaskVecError(f"{info.path}: tensor {info.name}: file ended early (truncated)")
            done += n
        return view

    def read_rows(self, info: TensorInfo, first_row: int, n_rows: int, buffer) -> torch.Tensor:
        """Rows of a tensor as a typed view over `buffer` (flat; no copy beyond the read)."""
        return as_tensor(self.read_into(info, first_row, n_rows, buffer), info.dtype)

    def iter_blocks(self, info: TensorInfo, block_elems: int, buffer: bytearray):
        """Typed views over consecutive row blocks of a tensor (the buffer is reused)."""
        rows_per_block = max(1, block_elems // max(1, info.row_numel))
        for r0 in range(0, info.rows if info.numel else 0, rows_per_block):
            n_rows = min(rows_per_block, info.rows - r0)
            yield self.read_rows(info, r0, n_rows, buffer)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A whole (small) tensor, e.g. a LoRA factor."""
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        self.read_into(info, 0, info.rows, buffer)
        return as_tensor(buffer, info.dtype).reshape(info.shape).clone()

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def as_tensor(buffer, dtype: str) -> torch.Tensor:
    """A typed torch view over raw bytes (no copy)."""
    import torch

    if len(buffer) == 0:
        return torch.empty(0, dtype=torch_dtype(dtype))
    return torch.frombuffer(buffer, dtype=torch.uint8).view(torch_dtype(dtype))
