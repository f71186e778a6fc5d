"""taskvec.json: what wrote an output folder, from what, and how. Written in one place."""

from __future__ import annotations

import datetime
from pathlib import Path

from taskvec import jsonfile
from taskvec.errors import TaskVecError
from taskvec.writer import write_json

NAME = "taskvec.json"
# Also recorded in every shard's safetensors metadata: a task vector stays one when its
# taskvec.json is lost.
KIND_KEY = "taskvec_kind"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("sku-unlearn")
    except PackageNotFoundError:
        return "unknown"


def write(folder: Path, kind: str, operation: str, **fields) -> None:
    """The record every output carries: kind, operation, its inputs and options, when."""
    write_json(Path(folder) / NAME, {
        "format": "taskvec", "taskvec_version": version(), "kind": kind,
        "operation": operation, **fields,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    })


def recorded_kind(path: Path) -> str | None:
    """The kind a folder's (or a file's folder's) taskvec.json records, if any."""
    record = (Path(path) if Path(path).is_dir() else Path(path).parent) / NAME
    try:
        found = jsonfile.load(record) if record.is_file() else None
    except TaskVecError:
        return None
    return found.get("kind") if isinstance(found, dict) else None
