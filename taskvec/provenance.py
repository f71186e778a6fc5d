"""taskvec.json: what wrote an output folder, from what, and how. Written in one place."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from taskvec.writer import write_json

NAME = "taskvec.json"


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
    path = Path(path)
    try:
        return json.loads(((path if path.is_dir() else path.parent) / NAME).read_text()).get(
            "kind")
    except (OSError, ValueError, AttributeError):
        return None
