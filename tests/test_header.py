"""The safetensors header codec: golden bytes against the reference serializer, and validation."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from streammerge.errors import CheckpointError
from streammerge.header import encode_header, parse_header, read_header

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}

tensor_specs = st.dictionaries(
    keys=st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"\\'), min_size=1, max_size=12)
    .filter(lambda s: s != "__metadata__"),
    values=st.tuples(st.sampled_from(sorted(_DTYPES)), st.lists(st.integers(0, 4), max_size=3).map(tuple)),
    min_size=1,
    max_size=6,
)


@given(tensor_specs, st.booleans())
def test_encode_header_matches_safetensors_bytes(specs, with_meta):
    tensors = {name: torch.zeros(shape, dtype=_DTYPES[dt]) for name, (dt, shape) in specs.items()}
    meta = {"format": "pt"} if with_meta else None
    reference = save(tensors, metadata=meta)
    ours, infos = encode_header(((n, dt, s) for n, (dt, s) in specs.items()), meta)
    assert reference[: len(ours)] == ours
    parsed = parse_header(ours, file_size=len(reference))
    assert parsed.tensors == infos
    assert parsed.file_size == len(reference)


def _file(tmp_path, data: bytes):
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    return p


def _raw(doc: str) -> bytes:
    body = doc.encode()
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"\x01\x02", "too short", id="shorter-than-8"),
        pytest.param(struct.pack("<Q", 10**12) + b"{}", "impossible", id="length-beyond-file"),
        pytest.param(_raw("{not json"), "not valid JSON", id="bad-json"),
        pytest.param(_raw("[1,2]"), "not a JSON object", id="not-object"),
        pytest.param(_raw('{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}') + b"x", "dtype 'Q9'", id="dtype"),
        pytest.param(_raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}') + b"xxxx", "needs 8 bytes",
                     id="shape-vs-bytes"),
        pytest.param(_raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}') + b"xx", "truncated",
                     id="truncated"),
        pytest.param(_raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                          '"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}') + b"xxx", "overlaps", id="overlap"),
        pytest.param(_raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}') + b"xx", "hole", id="hole"),
        pytest.param(_raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                          '"b":{"dtype":"U8","shape":[2],"data_offsets":[1099511627776,1099511627778]}}') + b"x",
                     "tensor 'b' has data_offsets \\[1099511627776, 1099511627778\\] beyond the file's 1 data bytes",
                     id="offsets-beyond-file"),
        pytest.param(_raw('{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}') + b"x", "invalid shape",
                     id="negative-shape"),
        pytest.param(_raw('{"__metadata__":{"a":1}}'), "__metadata__", id="metadata-not-strings"),
    ],
)
def test_bad_headers_are_named_checkpoint_errors(tmp_path, data, message):
    path = _file(tmp_path, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


@given(st.binary(max_size=200))
def test_parser_only_raises_checkpoint_error_on_random_bytes(data):
    raw = struct.pack("<Q", len(data)) + data
    try:
        parse_header(raw, file_size=len(raw) + 16)
    except CheckpointError:
        pass


@given(tensor_specs, st.data())
def test_parser_only_raises_checkpoint_error_on_mutated_headers(specs, data):
    raw, _ = encode_header((n, dt, s) for n, (dt, s) in specs.items())
    body = bytearray(raw[8:])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    try:
        parse_header(struct.pack("<Q", len(body)) + bytes(body), file_size=len(raw) + data.draw(st.integers(0, 64)))
    except CheckpointError:
        pass
