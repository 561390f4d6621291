"""Codec: raw-byte round trips per dtype (bf16 bit-exact), validation errors, and the gRPC options."""

import pytest
import torch

from protos import expert_pb2
from protos.codec import GRPC_OPTIONS, decode_tensor, encode_tensor


def wire(t: torch.Tensor) -> torch.Tensor:
    msg = expert_pb2.Tensor.FromString(encode_tensor(t).SerializeToString())
    return decode_tensor(msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    x = torch.randn(5, 7, 3).to(dtype)
    x[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")]).to(dtype)
    msg = encode_tensor(x)
    assert msg.dtype == str(dtype).removeprefix("torch.")
    assert list(msg.shape) == [5, 7, 3]
    assert len(msg.data) == x.numel() * x.element_size()  # stays in its dtype on the wire
    y = wire(x)
    assert y.dtype == dtype and y.shape == x.shape
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y.view(bits), x.view(bits))


def test_bf16_bytes_are_the_raw_bits():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    assert encode_tensor(x).data == x.view(torch.int16).numpy().tobytes()


def test_non_contiguous_and_empty():
    x = torch.randn(4, 6).t()
    assert torch.equal(wire(x), x)
    e = torch.empty(0, 64, dtype=torch.bfloat16)
    y = wire(e)
    assert y.shape == (0, 64) and y.dtype == torch.bfloat16
    assert wire(torch.tensor(3.0)).shape == ()


def test_decoded_tensor_is_usable_and_clonable():
    x = torch.randn(3, 4)
    y = wire(x)
    z = y.clone()
    z += 1
    assert torch.equal(y, x) and torch.equal(z, x + 1)


def test_expected_dtype_and_shape_tail():
    msg = encode_tensor(torch.zeros(2, 64, dtype=torch.float16))
    assert decode_tensor(msg, expected_dtype="float16", expected_shape_tail=(64,)).shape == (2, 64)
    assert decode_tensor(msg, expected_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype is float16, expected float32"):
        decode_tensor(msg, expected_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"shape \[2, 64\] does not end in \[32\]"):
        decode_tensor(msg, expected_shape_tail=(32,))


@pytest.mark.parametrize("msg, match", [
    (expert_pb2.Tensor(data=b"\0" * 8, dtype="int8", shape=[8]), "dtype 'int8' is not one of"),
    (expert_pb2.Tensor(data=b"\0" * 8, dtype="", shape=[2]), "dtype '' is not one of"),
    (expert_pb2.Tensor(data=b"", dtype="float32", shape=[-1, 4]), "negative dimension"),
    (expert_pb2.Tensor(data=b"\0" * 7, dtype="float32", shape=[2]),
     "7 bytes, but shape \\[2\\] of float32 needs 8"),
    (expert_pb2.Tensor(data=b"\0" * 8, dtype="bfloat16", shape=[2, 4]), "needs 16"),
    (expert_pb2.Tensor(data=b"\0" * 4, dtype="float16", shape=[0, 4]), "needs 0"),
])
def test_bad_tensors_raise_value_error(msg, match):
    with pytest.raises(ValueError, match=match):
        decode_tensor(msg)


def test_encode_rejects_other_dtypes():
    with pytest.raises(ValueError, match="cannot go on the wire"):
        encode_tensor(torch.zeros(3, dtype=torch.int64))


def test_grpc_options_set_both_limits():
    opts = dict(GRPC_OPTIONS(1234))
    assert opts["grpc.max_send_message_length"] == 1234
    assert opts["grpc.max_receive_message_length"] == 1234
