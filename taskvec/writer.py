"""Writing checkpoint folders: atomically, shard by shard, with the exact header first.

This module only knows files. An output folder is built in a hidden temporary sibling and
renamed into place after every file is fsynced, so a failed or interrupted run leaves nothing
at the destination and no temporary folder behind; what a killed run leaves is finished by the
next run to the same destination (see OutputDir).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

from taskvec.errors import InterruptedAfterWrite, TaskVecError
from taskvec.reader import INDEX_NAME, itemsize

TMP_MARK = ".taskvec-tmp-"
OLD_MARK = ".taskvec-old-"
log = logging.getLogger(__name__)


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


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# Linux renameat2(2): RENAME_EXCHANGE swaps two paths in one step, RENAME_NOREPLACE refuses an
# existing destination; os.rename can do neither. Where the kernel, libc or filesystem lacks
# them we fall back to plain renames (a journalled swap, see OutputDir).
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_LIBC = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done, False when unsupported here; raises OSError on a real failure."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    function = getattr(_LIBC, "renameat2", None) if _LIBC else None
    if function is None:
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _siblings(parent: Path, prefix: str):
    """(path, pid) of the entries named exactly `prefix` + a process id; by name, not by glob,
    so that an output called `*` or `a[1]` never matches another output's entries."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit():
            yield parent / name, int(pid)


class OutputDir:
    """Context manager: yields a temporary folder that becomes `out` only on success.

    The switch is atomic where Linux renameat2 is available: the new output moves into place
    with RENAME_NOREPLACE (a concurrent run that got there first wins; this one is refused), or
    with --force is exchanged with the old one by RENAME_EXCHANGE, so at every instant `out` is
    the complete old or the complete new output. Elsewhere the old output is first renamed to
    `.OUT.taskvec-old-PID`, a name that serves as the journal: a run that finds one of a dead
    process restores it when `out` is missing and removes it when `out` is there. A symbolic
    link `out` is followed: its target is replaced and the link kept.
    """

    def __init__(self, out: Path, force: bool = False):
        out = Path(out)
        self.out = Path(os.path.realpath(out)) if out.is_symlink() else out
        self.force = force
        self.tmp = self._sibling(TMP_MARK, os.getpid())

    def _sibling(self, mark: str, pid) -> Path:
        return self.out.parent / f".{self.out.name}{mark}{pid}"

    def __enter__(self) -> Path:
        if not self.out.parent.is_dir():
            raise TaskVecError(f"{self.out.parent}: parent folder does not exist")
        self._recover()
        if os.path.lexists(self.out) and not self.force:
            raise TaskVecError(f"{self.out}: already exists (pass --force to replace it)")
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
            old = self._swap()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        # The new output is in place: what is left is cleanup, and a failure or a signal now
        # must not be reported as "nothing was written".
        try:
            if old is not None:
                try:
                    _remove(old)
                except OSError as e:  # the next run to this --out removes it
                    log.warning("%s: could not remove the previous output: %s", old,
                                e.strerror or e)
            _fsync_dir(self.out.parent)
        except KeyboardInterrupt:
            raise InterruptedAfterWrite(self.out) from None

    def _swap(self) -> Path | None:
        """Move the temporary to `out`; returns where the old output now is (to remove)."""
        try:
            return self._move_into_place()
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise self._taken() from None
            raise TaskVecError(f"{self.out}: could not move the new output into place: "
                               f"{e.strerror}; the previous output, if any, is unchanged") from None

    def _move_into_place(self) -> Path | None:
        exists = os.path.lexists(self.out)
        if exists and not self.force:
            raise self._taken()
        if not exists:
            if not _renameat2(self.tmp, self.out, _RENAME_NOREPLACE):
                # Without renameat2 a run that gets there between these two calls is replaced
                # (an empty folder) or makes the rename fail (ENOTEMPTY).
                if os.path.lexists(self.out):
                    raise self._taken()
                os.rename(self.tmp, self.out)
            return None
        if _renameat2(self.tmp, self.out, _RENAME_EXCHANGE):
            return self.tmp  # the old output now lives under the temporary's name
        old = self._sibling(OLD_MARK, os.getpid())
        os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            try:
                os.rename(old, self.out)
            except OSError:
                raise TaskVecError(
                    f"{self.out}: could not move the new output into place, nor the previous "
                    f"one back; it is kept at {old}, and the next run to {self.out} "
                    "restores it") from None
            raise
        return old

    def _taken(self) -> TaskVecError:
        return TaskVecError(f"{self.out}: appeared while this run was writing (another run?); "
                            "it was left as it is and nothing was written (pass --force to "
                            "replace it)")

    def _recover(self) -> None:
        """Finish what runs killed without a chance to clean up (SIGKILL, power loss) left:
        their temporaries go; an old output moved aside comes back if `out` is missing and
        goes if `out` (then always a complete output) is in place."""
        parent, name = self.out.parent, self.out.name
        for stale, pid in _siblings(parent, f".{name}{TMP_MARK}"):
            if not _pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
        for old, pid in _siblings(parent, f".{name}{OLD_MARK}"):
            if _pid_alive(pid):
                continue
            if os.path.lexists(self.out):
                _remove(old)
            else:
                os.rename(old, self.out)
                log.warning("%s: restored the previous output from %s (left by an interrupted "
                            "run)", self.out, old.name)


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
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], position + done)
        except OSError as e:  # pwrite names no file: the message must
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def finish(self) -> None:
        """fsync and close; refuses a file whose data does not fill its header."""
        try:
            if self._written != self._expected:
                raise TaskVecError(f"{self.path}: wrote {self._written} data bytes, "
                                   f"header declares {self._expected}")
            os.fsync(self._fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # write and fsync name no file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
