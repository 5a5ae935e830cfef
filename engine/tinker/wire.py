"""The Tinker wire format, through the SDK's own generated protobuf module (`tinker.proto`),
so there is one source for it: forward_backward requests in (maybe zstd-compressed),
ForwardBackwardOutput and SampleResponse out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

PROTOBUF = "application/x-protobuf"
_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


class WireError(ValueError):
    """A request body that is not what the SDK sends."""


@dataclass
class Datum:
    tokens: list[int]  # model_input: its text chunks' tokens, in order
    inputs: dict[str, np.ndarray]  # loss_fn_inputs, flat


@dataclass
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict
    forward_only: bool
    data: list[Datum]


def _tensor(msg: pb.Tensor, name: str) -> np.ndarray:
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}")
    if msg.HasField("sparse_csr"):
        shape = list(msg.shape)
        if len(shape) != 2:
            raise WireError(f"loss_fn_inputs[{name!r}]: a sparse tensor must be 2-D")
        dense = np.zeros(shape, dtype=dtype)
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        for row in range(shape[0]):
            dense[row, cols[crow[row] : crow[row + 1]]] = values[crow[row] : crow[row + 1]]
        return dense.reshape(-1)
    return np.frombuffer(msg.dense, dtype=dtype).copy()


def parse_forward_backward(body: bytes, content_encoding: str | None) -> ForwardBackward:
    if (content_encoding or "").lower() == "zstd":
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        except zstandard.ZstdError as exc:
            raise WireError(f"the zstd body does not decompress: {exc}") from None
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise WireError(f"the body is not a ForwardBackwardRequest protobuf: {exc}") from None
    config: dict = {k: v for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins where both are set
        config[k] = v.text if v.WhichOneof("value") == "text" else v.number
    data = []
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in d.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"data[{i}].model_input: only text chunks are supported (got {kind or 'an empty chunk'})")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        data.append(Datum(tokens, {name: _tensor(t, name) for name, t in d.loss_fn_inputs.items()}))
    return ForwardBackward(msg.model_id, msg.seq_id, msg.loss_fn, config, msg.forward_only, data)


def _batched(arrays: list[np.ndarray], dtype=np.float32) -> pb.BatchedTensor:
    parts = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.nbytes for p in parts])
    return pb.BatchedTensor(data=b"".join(p.tobytes() for p in parts), offsets=offsets.tobytes(),
                            dtype=pb.DTYPE_FLOAT32 if dtype == np.float32 else pb.DTYPE_INT64)


def forward_backward_output(fields: dict[str, list[np.ndarray]], metrics: dict[str, float]) -> bytes:
    """One ArrayRecord with a field per output (one flat array per datum)."""
    n = len(next(iter(fields.values()))) if fields else 0
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=n,
                            fields={name: _batched(arrays) for name, arrays in fields.items()})
    return pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record],
                                    metrics=metrics).SerializeToString()


def sample_response(sequences: list[tuple[list[int], list[float], bool]]) -> bytes:
    """(tokens, log-probs, stopped) per sequence; stopped False means it hit max_tokens."""
    out = pb.SampleResponse()
    for tokens, logprobs, stopped in sequences:
        out.sequences.add(stop_reason=pb.STOP_REASON_STOP if stopped else pb.STOP_REASON_LENGTH,
                          tokens=np.asarray(tokens, dtype=np.int32).tobytes(),
                          logprobs=np.asarray(logprobs, dtype=np.float32).tobytes())
    return out.SerializeToString()
