"""An append-only verdict cache, so that no verdict already paid for is asked for twice."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

from sku.evaluation.judges.prompt import PROMPT_VERSION
from sku.evaluation.judges.verdict import JudgeError, Verdict


def cache_key(judge: str, prompt: str, response: str) -> str:
    payload = json.dumps([judge, PROMPT_VERSION, prompt, response], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class CacheWriteError(JudgeError):
    """A verdict could not be saved (disk full): asking on would pay for verdicts that are
    lost; judge_pairs stops and says how many were saved."""


class VerdictCache:
    """Append-only JSONL of {key, verdict}, one line flushed and fsynced per verdict. A line cut
    short by a crash (even inside a UTF-8 character) is ignored when read; the next append
    starts on a fresh line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.verdicts: dict[str, Verdict] = {}
        self.unsaved = 0  # verdicts received whose line could not be written
        if self.path.is_dir():
            raise JudgeError(f"{self.path}: is a folder; the judge cache is a file")
        if self.path.is_file():  # not a device (--cache /dev/full reads forever)
            try:
                lines = self.path.read_bytes().splitlines()
            except OSError as e:
                raise JudgeError(f"{self.path}: unreadable: {e.strerror or e}") from None
            for line in lines:
                try:
                    record = json.loads(line)
                    self.verdicts[record["key"]] = Verdict(**record["verdict"])
                except (ValueError, KeyError, TypeError):  # ValueError: JSON, UTF-8
                    continue
        self._lock = threading.Lock()

    def get(self, key: str) -> Verdict | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        line = json.dumps({"key": key, "verdict": asdict(verdict)}, ensure_ascii=False)
        with self._lock:
            self.verdicts[key] = verdict
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a+b") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                        f.write(b"\n")
                    f.write(line.encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                self.unsaved += 1
                raise CacheWriteError(f"{self.path}: cannot save a verdict: "
                                      f"{e.strerror or e}") from None
