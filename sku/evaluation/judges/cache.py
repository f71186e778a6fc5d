"""An append-only verdict cache, so that no verdict already paid for is asked for twice."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

from sku.evaluation.judges.prompt import PROMPT_VERSION
from sku.evaluation.judges.verdict import Verdict


def cache_key(judge: str, prompt: str, response: str) -> str:
    payload = json.dumps([judge, PROMPT_VERSION, prompt, response], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class VerdictCache:
    """Append-only JSONL of {key, verdict}, one line flushed and fsynced per verdict. A line cut
    short by a crash is ignored when read; the next append starts on a fresh line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.verdicts: dict[str, Verdict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.verdicts[record["key"]] = Verdict(**record["verdict"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._lock = threading.Lock()

    def get(self, key: str) -> Verdict | None:
        return self.verdicts.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        line = json.dumps({"key": key, "verdict": asdict(verdict)}, ensure_ascii=False)
        with self._lock:
            self.verdicts[key] = verdict
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")
                f.write(line.encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
