"""Property-based fuzzing of what taskvec parses from files it did not write: safetensors
headers, index files, adapter_config.json. Each input ends in a correct result or in one
TaskVecError line, never another exception. A header taskvec accepts must be one safetensors
itself accepts, with the same tensors (the independent reference).

Bounded and derandomized for CI (a few seconds); for a long local run:
    TASKVEC_FUZZ_EXAMPLES=20000 python -m pytest -q tests/taskvec/test_taskvec_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from taskvec import TaskVecError
from taskvec.adapter import LoraSettings, parse_config
from taskvec.jsonfile import parse
from taskvec.reader import DTYPES, itemsize, parse_index, read_header

FUZZ = settings(max_examples=int(os.environ.get("TASKVEC_FUZZ_EXAMPLES", "300")),
                deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=16)


def _one_line(error: TaskVecError) -> None:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message


@st.composite
def headers(draw) -> tuple[bytes, int]:
    """(the file's bytes, the data length it claims): mostly near-valid headers, each field
    sometimes off by a little or of another JSON type."""
    entries: dict = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F4", "f32", ""])
                     | values)
        shape = draw(st.lists(st.integers(0, 3), max_size=3) | values)
        valid = (isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list)
                 and all(type(d) is int and 0 <= d <= 4 for d in shape))
        nbytes = itemsize(dtype) * math.prod(shape) if valid else draw(st.integers(0, 16))
        begin = offset + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 8]))
        end = begin + nbytes + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        offsets = draw(st.just([begin, end]) | st.just([end, begin]) | values)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entries[name] = draw(values)  # not an object, or one without the fields
        offset = max(offset, end if isinstance(end, int) else offset)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4))
                                       | values)
    text = json.dumps(entries)
    if entries and draw(st.integers(0, 9)) == 0:  # a key twice: json.loads keeps the last
        first = next(iter(entries))
        text = text[:-1] + f", {json.dumps(first)}: {json.dumps(entries[first])}}}"
    if draw(st.integers(0, 19)) == 0:
        text = draw(st.text(max_size=40) | values.map(json.dumps))
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    data = max(0, offset + draw(st.sampled_from([0, 0, 0, 1, -1, 8])))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 10**6]))
    return struct.pack("<Q", max(0, length)) + raw + bytes(data), data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


@FUZZ
@given(case=headers())
def test_header_parser(scratch, case):
    content, _ = case
    scratch.write_bytes(content)
    try:
        _, tensors = read_header(scratch)
    except TaskVecError as error:
        _one_line(error)
        event("refused")
        return
    event(f"accepted, {len(tensors)} tensors")
    # Accepted: the data region is tiled exactly, and safetensors agrees on every tensor.
    data_start = 8 + struct.unpack("<Q", content[:8])[0]
    assert sum(t.nbytes for t in tensors) == len(content) - data_start
    with safe_open(scratch, "pt") as f:
        assert set(f.keys()) == {t.name for t in tensors}
        for t in tensors:
            assert tuple(f.get_slice(t.name).get_shape()) == t.shape
            assert f.get_slice(t.name).get_dtype() == t.dtype


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_json_parser_on_any_bytes(raw):
    try:
        parse(raw, "x.json")
    except TaskVecError as error:
        _one_line(error)


@st.composite
def indexes(draw):
    weight_map = draw(st.dictionaries(
        st.text(max_size=6),
        st.sampled_from(["model-1.safetensors", "", ".", "..", "../x", "a/b"]) | values,
        max_size=4) | values)
    return draw(st.just({"metadata": {}, "weight_map": weight_map}) | values)


@FUZZ
@given(index=indexes())
def test_index_parser(index):
    try:
        weight_map = parse_index(index, Path("model.safetensors.index.json"))
    except TaskVecError as error:
        _one_line(error)
        return
    assert weight_map == index["weight_map"]
    assert all(isinstance(s, str) and s not in ("", ".", "..") and "/" not in s
               for s in weight_map.values())


FIELDS = {
    "r": st.integers(-1, 64) | values,
    "lora_alpha": st.integers(-8, 64) | st.floats() | values,
    "use_rslora": st.booleans() | values,
    "fan_in_fan_out": st.booleans() | values,
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "(", "v_.*", ""]),
                                    st.integers(-1, 8) | values, max_size=3) | values,
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "[", "k"]),
                                     st.floats() | values, max_size=3) | values,
    "peft_type": st.sampled_from(["LORA", "IA3"]) | values,
    "use_dora": st.booleans() | values,
}


@FUZZ
@given(config=st.fixed_dictionaries({}, optional=FIELDS) | values)
def test_adapter_config_parser(config):
    try:
        settings_ = parse_config(config, Path("adapter_config.json"))
    except TaskVecError as error:
        _one_line(error)
        return
    assert isinstance(settings_, LoraSettings)
    assert isinstance(settings_.r, int) and settings_.r >= 1
    assert math.isfinite(settings_.lora_alpha)
    assert all(isinstance(v, int) and v >= 1 for v in settings_.rank_pattern.values())
    assert all(math.isfinite(v) for v in settings_.alpha_pattern.values())
    assert isinstance(settings_.use_rslora, bool) and isinstance(settings_.fan_in_fan_out, bool)
