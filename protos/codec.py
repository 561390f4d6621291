"""Tensors to and from `expert_pb2.Tensor` (raw little-endian bytes, dtype kept: bf16 stays bf16), and the
gRPC options both ends of an expert channel use."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from protos import expert_pb2

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# decode_tensor views the message's immutable bytes, which torch warns about once per process: spend that
# warning here, silenced, rather than in the first request (and without touching the global filters).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot go on the wire (one of {sorted(DTYPES)})") from None


def encode_tensor(t: torch.Tensor) -> expert_pb2.Tensor:
    """The raw bytes of `t` (moved to CPU and made contiguous if it is not already); no dtype conversion."""
    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    # Reinterpret as bytes (works for bf16, which numpy lacks); tobytes() is the one copy.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return expert_pb2.Tensor(data=data, dtype=name, shape=list(t.shape))


def decode_tensor(msg: expert_pb2.Tensor, expected_dtype: str | torch.dtype | None = None,
                  expected_shape_tail: Sequence[int] | None = None) -> torch.Tensor:
    """A CPU tensor viewing the message's bytes (no copy beyond protobuf's own).

    The result shares memory with an immutable bytes object: treat it as read-only (clone before writing).
    Raises ValueError naming the problem for an unknown or unexpected dtype, a bad shape or a size mismatch.
    """
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {msg.dtype!r} is not one of {sorted(DTYPES)}")
    if expected_dtype is not None:
        want = DTYPES[expected_dtype] if isinstance(expected_dtype, str) else expected_dtype
        if dtype != want:
            raise ValueError(f"tensor dtype is {msg.dtype}, expected {dtype_name(want)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    if expected_shape_tail is not None:
        tail = tuple(expected_shape_tail)
        if len(shape) < len(tail) or shape[len(shape) - len(tail):] != tail:
            raise ValueError(f"tensor shape {list(shape)} does not end in {list(tail)}")
    data = msg.data
    itemsize = torch.empty((), dtype=dtype).element_size()
    want_bytes = math.prod(shape) * itemsize
    if len(data) != want_bytes:
        raise ValueError(f"tensor data has {len(data)} bytes, but shape {list(shape)} of {msg.dtype} needs "
                         f"{want_bytes}")
    if want_bytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)


def GRPC_OPTIONS(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options: the message size limit, both ways, and keepalive (KEEPALIVE_OPTIONS).

    bdp_probe off / larger lookahead / larger write buffer were measured on loopback (16-core host, unary
    Dispatch of 8 KiB-32 MiB bf16) and gained nothing, so they are left at gRPC's defaults. The bulk path is
    page-fault bound instead: glibc mallopt (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB) gave ~3x there."""
    n = int(max_message_bytes)
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n), *KEEPALIVE_OPTIONS]


# Keepalive, the same on both ends: each side pings an idle or silent connection every 5 s and drops it when a
# ping is unanswered for 5 s, so a dead peer or half-open connection shows within ~10 s even between calls; the
# server lets the client ping that often (its default minimum is 5 min, and it would answer with GOAWAY).
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                     ("grpc.http2.min_ping_interval_without_data_ms", 4000),
                     ("grpc.http2.min_time_between_pings_ms", 4000)]
