"""Writing checkpoint folders: atomically, shard by shard, with the exact header first.

This module only knows files. An output folder is built in a hidden temporary sibling and
renamed into place after every file is fsynced, so a failed or interrupted run leaves nothing
at the destination and no temporary folder behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from taskvec.errors import TaskVecError
from taskvec.reader import INDEX_NAME, itemsize

TMP_MARK = ".taskvec-tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """Context manager: yields a temporary folder that becomes `out` only on success."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise TaskVecError(f"{self.out}: already exists (pass --force to replace it)")
        if not self.out.parent.is_dir():
            raise TaskVecError(f"{self.out.parent}: parent folder does not exist")
        self._remove_stale_temporaries()
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            # Files in subfolders too (accelerate's sharded checkpoints), each folder after
            # its files.
            for f in sorted(self.tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if f.is_dir():
                    _fsync_dir(f)
                else:
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
            _fsync_dir(self.tmp)
            if self.out.exists():
                # Keep the old output until the new one is complete, then swap.
                old = self.out.parent / f".{self.out.name}.taskvec-old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.tmp, self.out)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                os.rename(self.tmp, self.out)
            _fsync_dir(self.out.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _remove_stale_temporaries(self) -> None:
        """Temporaries of runs killed without a chance to clean up (SIGKILL, power loss)."""
        for stale in self.out.parent.glob(f".{self.out.name}{TMP_MARK}*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


class CheckpointWriter:
    """Writes safetensors shards into a folder: each shard's header first (all sizes are known
    up front), then its tensors' bytes in the declared order.

    Writes run on one background thread from a pool of two buffers, so the caller fills one
    block while the previous one is being copied to the page cache.
    """

    def __init__(self, folder: Path, block_bytes: int):
        self.folder = folder
        self._buffers = [bytearray(block_bytes), bytearray(block_bytes)]
        self._pending: list[Future | None] = [None, None]
        self._turn = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskvec-writer")
        self._file = None
        self._path: Path | None = None
        self._expected = self._written = 0

    def begin_shard(self, name: str, specs: Iterable[tuple[str, str, tuple[int, ...]]],
                    metadata: dict) -> None:
        self._finish_shard()
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        offset = 0
        for tensor, dtype, shape in specs:
            nbytes = itemsize(dtype) * math.prod(shape)
            header[tensor] = {"dtype": dtype, "shape": list(shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
        self._path, self._expected, self._written = self.folder / name, offset, 0
        self._file = open(self._path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def buffer(self, nbytes: int) -> memoryview:
        """A free block buffer to fill, then pass to `write`."""
        self._wait(self._turn)
        return memoryview(self._buffers[self._turn])[:nbytes]

    def write(self, view: memoryview) -> None:
        self._pending[self._turn] = self._executor.submit(self._file.write, view)
        self._written += len(view)
        self._turn ^= 1

    def close(self) -> None:
        try:
            self._finish_shard()
        finally:
            self._executor.shutdown(wait=True)

    def abort(self) -> None:
        """After a failure: stop writing; the caller discards the folder."""
        self._executor.shutdown(wait=True)
        if self._file is not None:
            self._file.close()
            self._file = None

    def _wait(self, turn: int) -> None:
        pending, self._pending[turn] = self._pending[turn], None
        if pending is not None:
            pending.result()  # re-raises a failed write (disk full) here

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._wait(0)
        self._wait(1)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if self._written != self._expected:
            raise TaskVecError(f"{self._path}: wrote {self._written} data bytes, "
                               f"header declares {self._expected}")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json(folder / INDEX_NAME,
               {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_atomic(path: Path, text: str) -> None:
    """A temporary sibling, fsynced, then renamed: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
