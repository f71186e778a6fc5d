"""Forget and normal data from files or the hub, as (prompt, response) pairs.

Forget data is PKU-SafeRLHF (v0 or v1 schema; only the five columns both share are read) or a
plain `{prompt, response[, is_safe]}` file. Normal data is TruthfulQA's `generation` config
(hub column names or the original CSV headers) or a plain `{prompt, response}` file.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sku.errors import SkuError, first_line, read_text


@dataclass(frozen=True)
class HubDataset:
    config: str | None
    split: str
    revision: str | None


# Pinned so that a run by id is reproducible; `ID@REVISION` picks another (PKU's old schema: @v0).
HUB_DATASETS = {
    "PKU-Alignment/PKU-SafeRLHF": HubDataset(
        None, "train", "d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0"),
    "truthfulqa/truthful_qa": HubDataset(
        "generation", "validation", "741b8276f2d1982aa3d5b832d3ee81ed3b896490"),
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")
_PKU_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class Pair(NamedTuple):
    prompt: str
    response: str
    record: int  # index of the source record, so splits.json can point back into the data


@dataclass
class ForgetData:
    source: str
    harmful: list[Pair]
    safe: list[Pair]


@dataclass
class NormalData:
    source: str
    pairs: list[Pair]


def _read_jsonl(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SkuError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return records


def _read_json(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text)  # `Dataset.to_json` writes JSON lines to *.json
    return data if isinstance(data, list) else [data]


# The text is in memory already; csv's 128 KiB field limit only refuses long responses.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)  # what the C long of csv's limit holds


def _read_csv(path: Path, text: str) -> list:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        return list(reader)
    except csv.Error as e:
        raise SkuError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise SkuError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                       "or convert the file to .jsonl or .csv") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise SkuError(f"{path}: not a readable parquet file: {first_line(e)}") from None


_TEXT_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}


def _read_file(path: Path) -> list:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    reader = _TEXT_READERS.get(path.suffix)
    if reader is None:
        raise SkuError(f"{path}: unsupported file type; expected .json, .jsonl, .csv or .parquet")
    return reader(path, read_text(path, encoding="utf-8-sig"))


def _read_hub(source: str) -> tuple[str, list]:
    dataset_id, _, revision = source.partition("@")
    spec = HUB_DATASETS.get(dataset_id, HubDataset(None, "train", None))
    revision = revision or spec.revision
    try:
        import datasets
    except ImportError:
        raise SkuError(f"{source}: loading a dataset by id needs the `datasets` package "
                       "(pip install datasets); or pass a local .jsonl/.json/.csv/.parquet file"
                       ) from None
    try:
        dataset = datasets.load_dataset(dataset_id, spec.config, split=spec.split,
                                        revision=revision)
    except Exception as e:  # the hub client raises many types; the user needs the first line
        raise SkuError(f"{source}: could not load it: {first_line(e)}") from None
    return f"{dataset_id}@{revision}" if revision else dataset_id, dataset.to_list()


def read_records(source: str) -> tuple[str, list[dict]]:
    """(resolved source, records with normalised column names) from a file or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        resolved, records = str(path), _read_file(path)
    elif path.is_dir():
        raise SkuError(f"{source}: is a folder; expected a .jsonl, .json, .csv or .parquet file")
    elif path.exists():  # a FIFO or device: reading it could block
        raise SkuError(f"{source}: not a regular file; expected a .jsonl, .json, .csv or "
                       ".parquet file")
    elif _HUB_ID.fullmatch(source) and path.suffix not in {*_TEXT_READERS, ".parquet"}:
        resolved, records = _read_hub(source)
    else:
        raise SkuError(f"{source}: no such file")
    if not records:
        raise SkuError(f"{resolved}: no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise SkuError(f"{resolved}: record {index} is not an object")
    return resolved, [{re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in r.items()}
                      for r in records]


def _require(source: str, records: list[dict], schemas: dict[str, tuple[str, ...]]) -> str:
    """The name of the first schema whose columns every record has, or a one-line error."""
    for name, columns in schemas.items():
        if all(c in record for record in records for c in columns):
            return name
    present = set(records[0])
    expected = " or ".join(f"({', '.join(c)})" for c in schemas.values())
    closest = min(schemas.values(), key=lambda c: len(set(c) - present))
    missing = [c for c in closest if any(c not in r for r in records)]
    raise SkuError(f"{source}: missing columns {', '.join(missing)}; expected columns {expected}")


def _text(value, where: str) -> str:
    """A text field; null is an empty one (dropped with the pair). A number or a list is a
    mistake that dropping would hide, so it is named."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SkuError(f"{where} is {type(value).__name__} {value!r:.40}, expected text")
    return value.strip()


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SkuError(f"{where}: {value!r} is not a boolean")


def _unique(pairs: Iterable[Pair]) -> list[Pair]:
    """Drop empty texts and repeated (prompt, response) pairs, keeping the first record."""
    first: dict[tuple[str, str], Pair] = {}
    for pair in pairs:
        if pair.prompt and pair.response:
            first.setdefault((pair.prompt, pair.response), pair)
    return list(first.values())


def load_forget(source: str) -> ForgetData:
    """Harmful (unsafe) and safe prompt-response pairs."""
    resolved, records = read_records(source)
    schema = _require(resolved, records, {"pku": _PKU_COLUMNS, "plain": ("prompt", "response")})
    harmful, safe = [], []
    for index, record in enumerate(records):
        where = f"{resolved}: record {index}"
        prompt = _text(record["prompt"], f"{where}: prompt")
        if schema == "pku":
            labelled = [(f"response_{i}", record[f"is_response_{i}_safe"]) for i in (0, 1)]
        else:
            labelled = [("response", record.get("is_safe", False))]
        for column, is_safe in labelled:
            pair = Pair(prompt, _text(record[column], f"{where}: {column}"), index)
            is_safe = _as_bool(is_safe, where)
            (safe if is_safe else harmful).append(pair)
    harmful = _unique(harmful)
    if not harmful:
        raise SkuError(f"{resolved}: no harmful (unsafe) responses")
    return ForgetData(resolved, harmful, _unique(safe))


def _answers(value) -> list[str]:
    """TruthfulQA's correct answers: a list (hub) or one ';'-joined string (original CSV)."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                return _answers(json.loads(value))
            except json.JSONDecodeError:
                pass
        return value.split(";")
    return list(value) if isinstance(value, (list, tuple)) else []


def load_normal(source: str) -> NormalData:
    """Normal pairs: TruthfulQA's best answer and each correct answer, or plain pairs."""
    resolved, records = read_records(source)
    schema = _require(resolved, records, {"truthfulqa": ("question", "best_answer"),
                                          "plain": ("prompt", "response")})
    pairs = []
    for index, record in enumerate(records):
        where = f"{resolved}: record {index}"
        if schema == "plain":
            pairs.append(Pair(_text(record["prompt"], f"{where}: prompt"),
                              _text(record["response"], f"{where}: response"), index))
            continue
        question = _text(record["question"], f"{where}: question")
        answers = [record["best_answer"], *_answers(record.get("correct_answers"))]
        pairs.extend(Pair(question, _text(a, f"{where}: an answer"), index) for a in answers)
    pairs = _unique(pairs)
    if not pairs:
        raise SkuError(f"{resolved}: no question-answer pairs")
    return NormalData(resolved, pairs)
