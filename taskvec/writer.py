"""Writing checkpoint folders: atomically, shard by shard, with the exact header first.

This module only knows files. An output folder is built in a hidden temporary sibling and
renamed into place after every file is fsynced, so a failed or interrupted run leaves nothing
at the destination and no temporary folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
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
            for f in self.tmp.iterdir():
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
    """Writes one safetensors file: header first (all sizes known up front), then the data
    of each tensor in the declared order, through `write`."""

    def __init__(self, path: Path, specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata):
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = itemsize(dtype)
            for dim in shape:
                nbytes *= dim
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference implementation aligns data to 8 bytes
        self.path = path
        self.data_bytes = offset
        self.written = 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, data) -> None:
        self.file.write(data)
        self.written += len(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.written != self.data_bytes:
            raise TaskVecError(
                f"{self.path}: wrote {self.written} data bytes, header declares {self.data_bytes}"
            )


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json(folder / INDEX_NAME,
               {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
