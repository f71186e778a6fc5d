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
import threading
from collections.abc import Iterable
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


class ShardWriter:
    """One safetensors file: the exact header first (every size is known up front), then each
    tensor's bytes written at their place, from any thread and in any order."""

    def __init__(self, path: Path, specs: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict):
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        offset = 0
        for tensor, dtype, shape in specs:
            nbytes = itemsize(dtype) * math.prod(shape)
            header[tensor] = {"dtype": dtype, "shape": list(shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
        data_start = 8 + len(raw)
        self.path = Path(path)
        self.offsets = {name: data_start + entry["data_offsets"][0]
                        for name, entry in header.items() if name != "__metadata__"}
        self._expected, self._written = offset, 0
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)

    def write(self, tensor: str, offset: int, data) -> None:
        """`data` (bytes-like) at byte `offset` of `tensor`'s data."""
        self._pwrite(data, self.offsets[tensor] + offset)
        with self._lock:
            self._written += len(data)

    def _pwrite(self, data, position: int) -> None:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], position + done)

    def finish(self) -> None:
        """fsync and close; refuses a file whose data does not fill its header."""
        try:
            if self._written != self._expected:
                raise TaskVecError(f"{self.path}: wrote {self._written} data bytes, "
                                   f"header declares {self._expected}")
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without syncing (the caller discards the folder)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
