"""gRPC inference messages <-> the HTTP codec: one decoder, so every check and message is the same.

A ``ModelInferRequest`` is translated into the HTTP request it is equivalent to, and decoded by
:func:`service.codec.decode_infer_request`:

* ``raw_input_contents`` (what tritonclient.grpc sends) become the binary tensor data extension:
  a JSON header whose inputs carry ``parameters.binary_data_size``, followed by the raw bytes in
  input order (one entry per input, or none at all, as the protocol requires);
* typed ``contents`` become the inputs' JSON ``data`` (the field named by :data:`CONTENTS` for the
  input's datatype; FP16 has none and must be raw). JSON has no inf or NaN, so non-finite floats
  are refused here, with the codec's message (UINT64 goes as binary data: JSON would turn values
  past 2**63 into floats when smaller ones sit beside them). Typed contents therefore count against
  ``BNFOLD_MAX_JSON_BYTES`` as their JSON does: large tensors belong in ``raw_input_contents``.

Outputs are returned as Triton's gRPC frontend returns them: all in ``raw_output_contents``
(little-endian bytes; BYTES as 4-byte length + bytes per element). Only when no output asks for
binary data (``binary_data`` false on every requested output, or a request parameter
``binary_data_output`` false) are they typed ``contents`` instead; the protocol does not allow
mixing the two in one response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from service import codec
from service.errors import InvalidInput

# Protocol datatype -> (typed contents field, numpy dtype its values pass through JSON as). int_contents
# holds INT8/16/32 as int32 and uint_contents UINT8/16/32 as uint32: the codec checks each datatype's range.
CONTENTS: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int64), "INT16": ("int_contents", np.int64), "INT32": ("int_contents", np.int64),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint64), "UINT16": ("uint_contents", np.uint64),
    "UINT32": ("uint_contents", np.uint64), "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float64), "FP64": ("fp64_contents", np.float64),  # float32 -> float64 is exact
    "BYTES": ("bytes_contents", None),  # outputs only: the service takes no BYTES inputs
}


def parameter(value: pb.InferParameter) -> Any:
    """The Python value of an ``InferParameter`` (whichever of its fields is set; ``None`` if none is)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _typed(tensor: pb.ModelInferRequest.InferInputTensor) -> Any:
    """The input's typed contents as what the JSON ``data`` of the same input would parse to."""
    entry = CONTENTS.get(tensor.datatype)
    if entry is None and tensor.datatype in codec.DATATYPES:  # FP16
        raise InvalidInput(f"input {tensor.name!r:.80} has datatype {tensor.datatype}, which has no typed contents "
                           "in the gRPC protocol: send it in raw_input_contents")
    if entry is None or entry[1] is None:  # not a datatype, or BYTES: the codec names what the model expects
        return []
    field, dtype = entry
    data = np.array(getattr(tensor.contents, field), dtype=dtype)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        count = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise InvalidInput(f"input {tensor.name!r} contents has {count} values that are not finite (inf or NaN)")
    return data


def as_http(request: pb.ModelInferRequest) -> tuple[bytes, int | None]:
    """The HTTP body (and ``Inference-Header-Content-Length``, ``None`` for plain JSON) equivalent to ``request``.

    Raises :class:`InvalidInput` for framing only the gRPC form can get wrong (raw entries not one
    per input, raw and typed contents mixed); everything else is the codec's to check.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                           "send one per input, in input order, or none")
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for k, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {tensor.name!r:.80} has typed contents, but the request uses "
                                   "raw_input_contents: send every input one way")
            blob = raw[k]
        else:
            data = _typed(tensor)
            # UINT64 values past 2**63 beside smaller ones would parse from JSON as float64: pass them as
            # the binary data they equal (a wrong count still goes as JSON, for its "elements" message).
            if tensor.datatype != "UINT64" or len(data) != math.prod(tensor.shape):
                entry["data"] = data
                inputs.append(entry)
                continue
            blob = data.astype("<u8").tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    binary_output = request.parameters.get("binary_data_output")
    header["parameters"] = {"binary_data_output": True if binary_output is None else parameter(binary_output)}
    if request.outputs:
        outputs = []
        for output in request.outputs:
            wanted: dict[str, Any] = {"name": output.name}
            binary = output.parameters.get("binary_data")
            if binary is not None:
                wanted["parameters"] = {"binary_data": parameter(binary)}
            outputs.append(wanted)
        header["outputs"] = outputs
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return encoded, None
    return b"".join([encoded, *blobs]), len(encoded)


def _raw(array: np.ndarray) -> bytes:
    if array.dtype.kind not in "biuf":  # BYTES: each element as a 4-byte little-endian length + its bytes
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1).tolist()]
        return b"".join(len(v).to_bytes(4, "little") + v for v in items)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _fill(contents: pb.InferTensorContents, datatype: str, name: str, array: np.ndarray) -> None:
    entry = CONTENTS.get(datatype)
    if entry is None:
        raise InvalidInput(f"output {name!r} is {datatype}, which has no typed contents in the gRPC protocol; "
                           "ask for it raw (binary_data true)")
    flat = array.reshape(-1).tolist()
    if datatype == "BYTES":
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
    getattr(contents, entry[0]).extend(flat)


def response(model_name: str, model_version: str, request: codec.InferRequest,
             outputs: Mapping[str, np.ndarray], specs: Sequence[codec.TensorSpec]) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` for ``outputs`` (raw unless no requested output wants binary data)."""
    datatypes = {spec.name: spec.datatype for spec in specs}
    names = request.outputs if request.outputs is not None else list(outputs)
    raw = bool(request.binary_outputs)
    message = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for name in names:
        array = outputs[name]
        datatype = datatypes.get(name) or "BYTES"
        tensor = message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            message.raw_output_contents.append(_raw(array))
        else:
            _fill(tensor.contents, datatype, name, array)
    return message
