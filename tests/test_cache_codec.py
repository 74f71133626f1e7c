"""Tests of cache/codec.py: bit-exact round trips for every dtype, and every kind of damage is a
CorruptEntry, never a wrong tensor."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.codec import DTYPES, MAGIC, VERSION, CorruptEntry, decode, encode, validate_tensors

KEY = "ab" * 32


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 200, shape, generator=generator).to(dtype)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names in the same order, same dtypes and shapes, same bits (NaN and -0.0 included)."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].reshape(-1).view(torch.uint8).tolist() == b[name].reshape(-1).view(torch.uint8).tolist(), name


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(dtype_name: str, shape: tuple[int, ...]):
    tensors = {"t": sample(DTYPES[dtype_name], shape)}
    assert_identical(decode(encode(tensors, key=KEY), expected_key=KEY), tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_special_float_values_survive_bit_for_bit(dtype: torch.dtype):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 65504.0]).to(dtype)
    assert_identical(decode(encode({"x": special})), {"x": special})


def test_many_tensors_keep_their_names_order_and_layout():
    tensors = {
        "tokens": sample(torch.float32, (64, 16)),
        "pooled": sample(torch.bfloat16, (16,)),
        "grid": sample(torch.int64, (8, 8)).t(),  # non-contiguous input
        "mask": sample(torch.bool, (64,)),
        "ünïcode name": sample(torch.uint8, (3,)),
        "": sample(torch.int32, (2,)),
    }
    decoded = decode(encode(tensors))
    assert_identical(decoded, tensors)
    assert all(t.is_contiguous() for t in decoded.values())


def test_an_empty_mapping_round_trips():
    assert decode(encode({})) == {}


def test_decoded_tensors_are_fresh_and_writable():
    data = encode({"x": torch.arange(4, dtype=torch.float32)})
    first = decode(data)["x"]
    first.add_(100)
    assert decode(data)["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_requires_grad_tensors_are_stored_as_plain_values():
    x = torch.ones(3, requires_grad=True) * 2
    assert decode(encode({"x": x}))["x"].tolist() == [2.0, 2.0, 2.0]


@settings(max_examples=40, deadline=None, database=None)
@given(
    dtype_name=st.sampled_from(list(DTYPES)),
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(dtype_name: str, shape: tuple[int, ...], seed: int):
    tensors = {"a": sample(DTYPES[dtype_name], shape, seed), "b": sample(torch.float32, (2,), seed)}
    assert_identical(decode(encode(tensors, key=KEY), expected_key=KEY), tensors)


# -- damage ---------------------------------------------------------------------------------------
SMALL = encode({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([True, False])}, key=KEY)


def test_every_single_byte_flip_is_detected():
    for position in range(len(SMALL)):
        damaged = bytearray(SMALL)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntry):
            decode(bytes(damaged), expected_key=KEY)


def test_every_truncation_is_detected():
    for length in range(len(SMALL)):
        with pytest.raises(CorruptEntry):
            decode(SMALL[:length])


def test_appended_bytes_are_detected():
    with pytest.raises(CorruptEntry):
        decode(SMALL + b"\0")


def test_an_entry_under_another_key_is_rejected():
    with pytest.raises(CorruptEntry, match="another key"):
        decode(SMALL, expected_key="cd" * 32)
    assert list(decode(SMALL)) == ["a", "b"]  # without an expected key, any key is accepted


@pytest.mark.parametrize("value", [None, 42, "text", [1, 2]])
def test_non_bytes_are_rejected(value: object):
    with pytest.raises(CorruptEntry):
        decode(value)  # type: ignore[arg-type]


def test_a_pickle_is_rejected_not_loaded():
    with pytest.raises(CorruptEntry):
        decode(pickle.dumps({"a": torch.zeros(2)}))


def craft(
    header: object, payload: bytes, *, magic: bytes = MAGIC, version: int = VERSION, raw_header: bytes | None = None
) -> bytes:
    """An entry with a VALID checksum around whatever header and payload: what a bug, or someone who
    can write the cache directory, could produce. The checksum cannot catch these; the checks must."""
    header_bytes = raw_header if raw_header is not None else json.dumps(header).encode()
    body = struct.pack("<4sHI", magic, version, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def entry(name: str = "x", dtype: str = "float32", shape: tuple = (2,), offset: int = 0, nbytes: int = 8) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


def header(*entries: dict, key: str = KEY, byteorder: str = sys.byteorder) -> dict:
    return {"key": key, "byteorder": byteorder, "tensors": list(entries)}


def test_crafted_valid_entry_decodes():
    assert decode(craft(header(entry()), bytes(8)))["x"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "bad",
    [
        craft(header(entry()), bytes(8), magic=b"NOPE"),
        craft(header(entry()), bytes(8), version=VERSION + 1),
        craft(None, bytes(8), raw_header=b"{not json"),
        craft(None, bytes(8), raw_header=b"\xff\xfe"),
        craft([1, 2], bytes(8)),
        craft({"tensors": [entry()]}, bytes(8)),  # no key
        craft(header(entry(), byteorder="big" if sys.byteorder == "little" else "little"), bytes(8)),
        craft(header(entry(shape=(3,))), bytes(8)),  # shape says 12 bytes, length says 8
        craft(header(entry(nbytes=12)), bytes(8)),  # runs past the end
        craft(header(entry()), bytes(12)),  # unexplained trailing bytes
        craft(header(entry(offset=4, nbytes=8)), bytes(12)),  # a gap before the first tensor
        craft(header(entry(dtype="float64", nbytes=16)), bytes(16)),
        craft(header(entry(dtype="object")), bytes(8)),
        craft(header(entry(shape=(-2,), nbytes=-8)), bytes(8)),
        craft(header(entry(shape=(2.0,))), bytes(8)),
        craft(header(entry(shape=(True, 2))), bytes(8)),
        craft(header(entry(), entry()), bytes(16)),  # "x" twice
        craft(header(entry(dtype="bool", shape=(2,), nbytes=2)), b"\x01\x02"),  # 2 is not a bool
        craft(header(entry(shape=(0, 2**70), nbytes=0)), b""),  # absurd shape with no bytes
        craft(header("not an entry"), b""),
    ],
)
def test_crafted_inconsistent_entries_are_rejected(bad: bytes):
    with pytest.raises(CorruptEntry):
        decode(bad)


def test_header_length_past_the_end_is_rejected():
    body = struct.pack("<4sHI", MAGIC, VERSION, 10_000) + b"{}"
    with pytest.raises(CorruptEntry):
        decode(body + hashlib.sha256(body).digest())


# -- what can be stored ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tensors", "error"),
    [
        ([("x", torch.zeros(1))], TypeError),
        ({"x": [1.0, 2.0]}, TypeError),
        ({1: torch.zeros(1)}, TypeError),
        ({"x": torch.zeros(1, dtype=torch.float64)}, ValueError),
        ({"x": torch.zeros(1, dtype=torch.complex64)}, ValueError),
        ({"x": torch.zeros(2, 2).to_sparse()}, ValueError),
        ({"x": torch.zeros(2, device="meta")}, ValueError),
    ],
)
def test_what_the_codec_cannot_store_is_refused_up_front(tensors: object, error: type[Exception]):
    with pytest.raises(error):
        validate_tensors(tensors)  # type: ignore[arg-type]
    with pytest.raises(error):
        encode(tensors)  # type: ignore[arg-type]
