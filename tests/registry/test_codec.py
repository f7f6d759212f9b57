"""Codec: keys and adapters survive a round trip; bad shapes, dtypes and NaN are refused."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from registry_helpers import KEY_DIM, make_adapter, make_config

from registry import codec
from registry.errors import CorruptEdit, ValidationError

CONFIG = make_config()


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, KEY_DIM, elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_key_round_trip_is_exact(key):
    data = codec.as_keys(key, KEY_DIM).tobytes()
    assert len(data) == KEY_DIM * 4
    np.testing.assert_array_equal(codec.decode_keys(data, KEY_DIM, 1, codec.sha256(data)), key[None])


def test_several_keys_round_trip_in_order():
    keys = np.arange(3 * KEY_DIM, dtype=np.float32).reshape(3, KEY_DIM)
    data = codec.as_keys(keys, KEY_DIM).tobytes()
    np.testing.assert_array_equal(codec.decode_keys(data, KEY_DIM, 1, codec.sha256(data)), keys)


def test_key_accepts_torch_and_other_float_dtypes():
    key = torch.arange(KEY_DIM, dtype=torch.float64)
    assert codec.as_keys(key, KEY_DIM).dtype == np.float32


@pytest.mark.parametrize("key, message", [
    (np.zeros(KEY_DIM + 1), r"shape \(16,\) or \(n, 16\) with 1 <= n <= 64, got \(17,\)"),
    (np.zeros((0, KEY_DIM)), r"got \(0, 16\)"),
    (np.zeros((65, KEY_DIM)), r"got \(65, 16\)"),
    (np.zeros((2, 2, KEY_DIM)), r"got \(2, 2, 16\)"),
    (np.full(KEY_DIM, np.nan), "NaN"),
    (np.full(KEY_DIM, np.inf), "NaN or infinite"),
])
def test_bad_keys_are_refused(key, message):
    with pytest.raises(ValidationError, match=message):
        codec.as_keys(key, KEY_DIM)


def test_stored_key_problems_name_the_edit():
    with pytest.raises(CorruptEdit, match="edit 7 key has 12 bytes, expected a multiple of 64"):
        codec.decode_keys(b"\0" * 12, KEY_DIM, 7)
    data = codec.as_keys(np.ones(KEY_DIM), KEY_DIM).tobytes()
    with pytest.raises(CorruptEdit, match="edit 7 key does not match its checksum"):
        codec.decode_keys(data, KEY_DIM, 7, "0" * 64)


def test_adapter_round_trip_is_exact():
    adapter = make_adapter(CONFIG, seed=3)
    data = codec.encode_adapter(adapter, CONFIG)
    back = codec.decode_adapter(data, CONFIG, 1, codec.sha256(data))
    assert set(back) == {"0.A", "0.B", "1.A", "1.B"}
    for name, tensor in adapter.items():
        assert torch.equal(back[name], tensor)
    assert codec.adapter_nbytes(CONFIG) == sum(t.numel() * 4 for t in adapter.values())


def test_adapter_bytes_are_plain_safetensors():
    import safetensors.torch

    data = codec.encode_adapter(make_adapter(CONFIG), CONFIG)
    assert data == safetensors.torch.save(make_adapter(CONFIG))


def test_non_contiguous_adapter_is_stored_contiguous():
    adapter = make_adapter(CONFIG)
    adapter["0.B"] = adapter["0.B"].T.contiguous().T  # same values, transposed strides
    back = codec.decode_adapter(codec.encode_adapter(adapter, CONFIG), CONFIG, 1)
    assert torch.equal(back["0.B"], adapter["0.B"])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("1.B"), r"has tensors \['0.A', '0.B', '1.A'\]"),
    (lambda a: a.update({"0.A": torch.zeros(3, 12)}), r"'0.A' has shape \(3, 12\), expected \(2, 12\)"),
    (lambda a: a.update({"1.B": torch.zeros(10, 2, dtype=torch.float16)}), "dtype torch.float16"),
    (lambda a: a["0.B"].__setitem__((0, 0), float("nan")), "'0.B' contains NaN"),
    (lambda a: a.update({"1.A": np.zeros((2, 12))}), "not a tensor"),
])
def test_bad_adapters_are_refused_precisely(change, message):
    adapter = make_adapter(CONFIG)
    change(adapter)
    with pytest.raises(ValidationError, match=message):
        codec.encode_adapter(adapter, CONFIG)


def test_stored_adapter_problems_name_the_edit():
    data = codec.encode_adapter(make_adapter(CONFIG), CONFIG)
    with pytest.raises(CorruptEdit, match="edit 4 adapter does not match its checksum"):
        codec.decode_adapter(data, CONFIG, 4, codec.sha256(b"other"))
    with pytest.raises(CorruptEdit, match="edit 4 adapter is not valid safetensors"):
        codec.decode_adapter(b"garbage", CONFIG, 4)
    with pytest.raises(CorruptEdit, match="edit 4 has no stored adapter"):
        codec.decode_adapter(None, CONFIG, 4)
    other = make_config(rank=3)
    with pytest.raises(CorruptEdit, match=r"edit 4 adapter tensor '0.A' has shape \(2, 12\), expected \(3, 12\)"):
        codec.decode_adapter(data, other, 4)


def test_json_refuses_nan():
    assert codec.decode_json(codec.encode_json({"b": 1, "a": [1.5]})) == {"a": [1.5], "b": 1}
    with pytest.raises(ValidationError, match="JSON"):
        codec.encode_json({"loss": float("nan")})
