"""Open Inference Protocol tensors <-> numpy, for JSON bodies and the binary tensor data extension.

A request body is either one JSON object, or (binary extension) ``N`` bytes of JSON followed by the
raw little-endian bytes of every input whose ``parameters.binary_data_size`` is set, in input order;
``N`` comes from the ``Inference-Header-Content-Length`` header. Responses are framed the same way
when the client asks for binary outputs. Everything is parsed without per-element Python work:
binary data goes through ``np.frombuffer`` (no copy); JSON data of a body over
:data:`service.jsondata.LIFT_BYTES` is read into one float64 buffer by simdjson (:mod:`service.jsondata`),
smaller or other JSON data through one ``np.asarray`` of orjson's lists. A JSON number's value is its
float64 value, cast to a floating-point input's datatype (whichever way it was parsed).

:class:`Limits` are checked from what a request declares, before anything is allocated for it:
the JSON size before parsing, each input's rows, elements and bytes from its ``shape`` and
``datatype`` before its array is built. Floating-point inputs must be finite in the model's
datatype (JSON ``1e300`` would be ``inf`` in FP32; binary data may hold inf or NaN bits): a model
fed ``inf`` or NaN answers NaN, not an error.
"""

from __future__ import annotations

import gc
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service import jsondata
from service.errors import InvalidInput, TooLarge

# Open Inference Protocol datatype -> numpy dtype (little-endian, as the binary extension specifies).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
# onnxruntime's type strings -> protocol datatype ("tensor(string)" is BYTES, which is not served).
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(string)": "BYTES",
}
# A JSON number past FP32's range is refused after the cast made it inf; numpy's warning about it says nothing more.
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning, r"service\.codec")
LARGE_JSON_BYTES = 64 * 1024  # JSON larger than this is parsed with the GC paused (and, by the service, off the loop)
# numpy kinds JSON data may arrive as, per target kind ("b" bool, "i"/"u" integer, "f" float).
_LITTLE_ENDIAN = sys.byteorder == "little"  # the wire's byte order (binary tensor data) is the machine's
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: protocol datatype and shape (``-1`` = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Limits:
    """Per-request size limits (the ``BNFOLD_*`` settings named in their errors)."""

    max_rows: int = 1024  # leading dimension of each input
    max_elements: int = 4 * 1024 * 1024  # elements of one input
    max_bytes: int = 16 * 1024 * 1024  # bytes of one input in its datatype
    max_json_bytes: int = 4 * 1024 * 1024  # the JSON part of a request

    def check_json(self, size: int) -> None:
        """Raises :class:`TooLarge` when a JSON body (or binary request header) of ``size`` bytes is over the limit."""
        if size > self.max_json_bytes:
            raise TooLarge(f"the request's JSON has {size} bytes, over the limit of {self.max_json_bytes} "
                           "(BNFOLD_MAX_JSON_BYTES); send large tensors as binary data")

    def check_tensor(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        """Raises :class:`TooLarge` when input ``name`` of ``shape`` and ``dtype`` would pass a limit."""
        rows = shape[0] if shape else 1
        if rows > self.max_rows:
            raise TooLarge(f"input {name!r} has {rows} rows, over the limit of {self.max_rows} rows per request "
                           "(BNFOLD_MAX_REQUEST_ROWS); split it into several requests")
        count = math.prod(shape)
        if count > self.max_elements:
            raise TooLarge(f"input {name!r} with shape {list(shape)} has {count} elements, over the limit of "
                           f"{self.max_elements} (BNFOLD_MAX_TENSOR_ELEMENTS)")
        if count * dtype.itemsize > self.max_bytes:
            raise TooLarge(f"input {name!r} with shape {list(shape)} needs {count * dtype.itemsize} bytes, over the "
                           f"limit of {self.max_bytes} (BNFOLD_MAX_TENSOR_BYTES)")


NO_LIMITS = Limits(max_rows=2**62, max_elements=2**62, max_bytes=2**62, max_json_bytes=2**62)


@dataclass
class InferRequest:
    """A decoded inference request: validated input arrays (in the model's input order, from a
    :class:`Decoder`) and which outputs to return, how."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None  # None = all outputs
    binary_outputs: set[str] = field(default_factory=set)


def _fail(message: str) -> InvalidInput:
    return InvalidInput(message)


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate the ``Inference-Header-Content-Length`` header against the body length."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):  # int() would take " 1_0" and 5000 digits
        raise _fail(f"Inference-Header-Content-Length must be an integer, got {value[:40]!r}")
    length = int(value)
    if not 0 < length <= body_length:
        raise _fail(f"Inference-Header-Content-Length is {length} but the body has {body_length} bytes")
    return length


def loads(data: bytes | memoryview) -> Any:
    """``orjson.loads``; JSON over :data:`LARGE_JSON_BYTES` is parsed with the cyclic GC paused.

    Parsing allocates one tracked object per list and dict, and the collector walks them again and
    again while they pile up: 4 MiB of ``[[[0]]],...`` parsed in 0.85 s with it, 0.19 s without
    (measured). The parse holds the GIL, so that is how long a probe may wait. Threads pausing it
    together each restore what they found, so it ends enabled unless something else disabled it.
    Raises :class:`InvalidInput` for malformed JSON.
    """
    pause = len(data) > LARGE_JSON_BYTES and gc.isenabled()
    if pause:
        gc.disable()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"malformed JSON: {exc}") from None
    finally:
        if pause:
            gc.enable()


def loads_body(body: bytes) -> Any:
    """A JSON request body parsed: with each input's flat ``data`` lifted (:func:`service.jsondata.loads`) from
    :data:`service.jsondata.LIFT_BYTES` on, else (or when that declines) :func:`loads`."""
    lifted = jsondata.loads(body) if len(body) >= jsondata.LIFT_BYTES and type(body) is bytes else None
    return loads(body) if lifted is None else lifted


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if isinstance(raw, list):  # a plain loop: this runs for every input of every request
        for d in raw:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(raw)
    raise _fail(f"input {name!r} shape must be a list of non-negative integers, got {raw!r:.80}")


def _check_shape(shape: tuple[int, ...], spec: TensorSpec) -> None:
    want = spec.shape
    if len(shape) == len(want):
        for expected, got in zip(want, shape, strict=True):
            if expected != got and expected != -1:
                break
        else:
            return
    raise _fail(f"input {spec.name!r} has shape {list(shape)}, the model expects {list(want)} (-1 = any)")


def _as_array(data: Any, spec: TensorSpec, what: str = "data") -> np.ndarray:
    """JSON numbers (flat or nested) as an array of the spec's dtype, refusing strings, ragged lists, overflow."""
    dtype = DATATYPES[spec.datatype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail(f"input {spec.name!r} {what} is not a regular (non-ragged) array of numbers: {exc}") from None
    if dtype.kind == "u" and dtype.itemsize == 8 and array.dtype.kind in "fO" and array.size:
        array = _uint64_integers(data, array, spec, what)
    if array.size and array.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        got = {"U": "strings", "O": "mixed values or objects", "b": "booleans", "f": "floats"}.get(
            array.dtype.kind, str(array.dtype))
        raise _fail(f"input {spec.name!r} has datatype {spec.datatype} but its {what} holds {got}")
    if array.size and array.dtype != dtype:
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise _fail(f"input {spec.name!r} values [{low}, {high}] do not fit {spec.datatype} "
                            f"[{info.min}, {info.max}]")
        else:  # JSON's float64 (an integer's, too: the value simdjson reads) past the range is inf after the cast
            cast = (array if array.dtype.kind == "f" else array.astype(np.float64)).astype(dtype)
            if not _all_finite(cast):  # JSON itself has no inf or NaN: only the cast makes them
                low, high = array.min(), array.max()
                raise _fail(f"input {spec.name!r} {what} holds values in [{low:.6g}, {high:.6g}], past the largest "
                            f"finite {spec.datatype} ({float(np.finfo(dtype).max):.6g}): they would be inf")
            return cast
    return array.astype(dtype, copy=False)


def _uint64_integers(data: Any, inferred: np.ndarray, spec: TensorSpec, what: str) -> np.ndarray:
    """JSON integers for a UINT64 input that numpy inferred as float64 or objects: it does so when one
    value is at least 2**63 and another is small, or any is past 2**64. Kept exact when every value is an
    integer (never a float or a boolean) within [0, 2**64 - 1]; otherwise ``inferred``, refused by the caller."""
    values = np.asarray(data, dtype=object)
    if values.shape != inferred.shape or not all(type(v) is int for v in values.flat):
        return inferred
    low, high = min(values.flat), max(values.flat)
    if low < 0 or high >= 1 << 64:
        raise _fail(f"input {spec.name!r} values [{low}, {high}] do not fit {spec.datatype} [0, {(1 << 64) - 1}]")
    return np.array(values.tolist(), dtype=np.uint64)


def _all_finite(array: np.ndarray) -> bool:
    """Whether no element is inf or NaN, in one call for 32/64-bit floats: their sum of squares is finite
    when they all are (else, or when the squares overflow, it is checked element-wise). 1 us instead of
    4-6 us for ``np.isfinite(a).all()`` on a small unaligned view of a request body (measured)."""
    if array.dtype.itemsize >= 4 and math.isfinite(np.vdot(array, array)):
        return True
    return bool(np.isfinite(array).all())


def _check_finite(array: np.ndarray, spec: TensorSpec, what: str) -> None:
    """Refuse inf and NaN (binary data arrives in the model's datatype and may hold them)."""
    if not _all_finite(array):
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise _fail(f"input {spec.name!r} {what} has {count} values that are not finite (inf or NaN)")


def _from_json(data: Any, shape: tuple[int, ...], spec: TensorSpec) -> np.ndarray:
    if type(data) is jsondata.Numbers:  # lifted out of the body: its float64 numbers, or orjson's list
        data = data.floats if data.floats is not None and DATATYPES[spec.datatype].kind == "f" else data.value()
    count = math.prod(shape)
    if isinstance(data, list | np.ndarray) and len(data) != count and (not shape or len(data) != shape[0]):
        # neither flat nor nested as declared: refused before numpy walks it (0.25 s for 4 MiB of [[[0]]],...)
        if isinstance(data, list) and data and isinstance(data[0], list):
            raise _fail(f"input {spec.name!r} data is not a regular (non-ragged) array of numbers shaped "
                        f"{list(shape)}: its outer list has {len(data)} entries")
        raise _fail(f"input {spec.name!r} with shape {list(shape)} needs {count} elements, got {len(data)}")
    array = _as_array(data, spec)
    if array.size != count:
        raise _fail(f"input {spec.name!r} with shape {list(shape)} needs {count} elements, got {array.size}")
    return array.reshape(shape)


class _Binary:
    """One input of a binary request, as its header declares it: where its bytes are and what they hold."""

    __slots__ = ("count", "dtype", "name", "offset", "shape", "size", "spec")

    def __init__(self, spec: TensorSpec, shape: tuple[int, ...], offset: int, size: Any) -> None:
        dtype = DATATYPES[spec.datatype]
        count = math.prod(shape)  # shape is within the limits
        if type(size) is not int or size < 0:
            raise _fail(f"input {spec.name!r} binary_data_size must be a non-negative integer, got {size!r:.40}")
        if size != count * dtype.itemsize:
            raise _fail(f"input {spec.name!r} {spec.datatype} with shape {list(shape)} needs "
                        f"{count * dtype.itemsize} bytes, binary_data_size says {size}")
        self.spec, self.name, self.dtype, self.shape = spec, spec.name, dtype, shape
        self.count, self.offset, self.size = count, offset, size

    def array(self, buffer: memoryview) -> np.ndarray:
        """This input's array: a read-only view of the request body, no copy (even unaligned: onnxruntime reads
        unaligned CPU buffers correctly, and batching concatenates into a fresh aligned array anyway)."""
        offset, size = self.offset, self.size
        if offset + size > len(buffer):
            raise _fail(f"input {self.name!r} needs bytes {offset}..{offset + size} of the binary data, "
                        f"which has only {len(buffer)}")
        dtype = self.dtype
        if dtype.kind == "b":
            return (np.frombuffer(buffer, np.uint8, self.count, offset) != 0).reshape(self.shape)
        array = np.frombuffer(buffer, dtype, self.count, offset).reshape(self.shape)
        if dtype.kind == "f":
            _check_finite(array, self.spec, "binary data")
        return array


class _Plan:
    """What a request header says, validated against the model: its JSON inputs' arrays (built already), its
    binary inputs (built from each body), and its id and outputs. Only the body's binary part is left to check."""

    __slots__ = ("binary", "binary_bytes", "binary_outputs", "id", "json", "order", "outputs")

    def __init__(self, order: list[str] | None) -> None:
        self.order = order  # the model's input names, in its order, for a model with several inputs
        self.json: dict[str, np.ndarray] = {}
        self.binary: list[_Binary] = []
        self.binary_bytes = 0
        self.id: str | None = None
        self.outputs: list[str] | None = None
        self.binary_outputs: set[str] = set()

    def request(self, binary: memoryview) -> InferRequest:
        """The request of a body whose binary part is ``binary`` (the sizes, then finiteness, checked)."""
        arrays = self.json.copy() if self.json else {}
        for entry in self.binary:
            arrays[entry.name] = entry.array(binary)
        if self.binary_bytes != len(binary):
            raise _fail(f"binary data has {len(binary)} bytes but the inputs' binary_data_size add up to "
                        f"{self.binary_bytes}")
        if self.order is not None:
            arrays = {name: arrays[name] for name in self.order}
        outputs = self.outputs
        return InferRequest(arrays, self.id, None if outputs is None else list(outputs), set(self.binary_outputs))


class Decoder:
    """:func:`decode_infer_request` for one model (``inputs``, ``outputs``) under ``limits``.

    It remembers the plans (:class:`_Plan`) of the last :data:`PLANS` binary-request headers it validated,
    by their bytes: a client's headers repeat byte for byte (same names, shapes and sizes), and a repeat
    then costs only its arrays' views and the finiteness check (4 us instead of 11 us for the digits
    model's header, measured). A header holding JSON data, or longer than :data:`PLAN_HEADER_BYTES`, is
    decoded afresh each time; past :data:`PLANS` headers the memory is cleared.

    What needs only the header (names, datatypes, shapes, limits) is checked before what needs the
    body (sizes against the binary part, finiteness): a request wrong in both ways gets the header's
    error, as the limits are checked before anything is built for it.
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], limits: Limits = NO_LIMITS
                 ) -> None:
        self.specs = {spec.name: spec for spec in inputs}
        self._order = list(self.specs) if len(self.specs) > 1 else None
        self.known_outputs = {spec.name for spec in outputs}
        self.limits = limits
        self._plans: dict[bytes, _Plan] = {}

    def decode(self, body: bytes, header_length: int | None) -> InferRequest:
        """Decode and validate one request (see :func:`decode_infer_request`)."""
        limits = self.limits
        if header_length is None:
            limits.check_json(len(body))
            return self._plan(loads_body(body), None).request(memoryview(b""))
        limits.check_json(header_length)
        view = memoryview(body)
        binary = view[header_length:]
        if header_length > PLAN_HEADER_BYTES:
            return self._plan(loads(view[:header_length]), header_length).request(binary)
        key = body[:header_length] if type(body) is bytes else bytes(view[:header_length])  # hashable, no view
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(loads(key), header_length)
            if not plan.json:  # a plan with JSON data holds arrays, and a client's data changes: not kept
                plans = self._plans
                if len(plans) >= PLANS:
                    plans.clear()
                plans[key] = plan
        return plan.request(binary)

    def _plan(self, header: Any, header_length: int | None) -> _Plan:
        if not isinstance(header, dict):
            raise _fail(f"request must be a JSON object, got {type(header).__name__}")
        raw_inputs = header.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise _fail("request needs a non-empty 'inputs' list")
        specs, limits = self.specs, self.limits
        plan = _Plan(self._order)
        seen: set[str] = set()
        offset = 0
        for raw in raw_inputs:
            if not isinstance(raw, dict):
                raise _fail(f"each input must be a JSON object, got {type(raw).__name__}")
            raw_name = raw.get("name")
            spec = specs.get(raw_name) if isinstance(raw_name, str) else None
            if spec is None:
                raise _fail(f"unknown input {raw_name!r:.80}; the model expects {sorted(specs)}")
            name = spec.name
            if name in seen:
                raise _fail(f"input {name!r} appears twice")
            seen.add(name)
            if raw.get("datatype") != spec.datatype:
                raise _fail(f"input {name!r} has datatype {raw.get('datatype')!r:.40}, the model expects "
                            f"{spec.datatype}")
            if spec.datatype not in DATATYPES:
                raise _fail(f"input {name!r} has datatype {spec.datatype}, which this server does not accept")
            shape = _shape(raw.get("shape"), name)
            _check_shape(shape, spec)
            limits.check_tensor(name, shape, DATATYPES[spec.datatype])
            params = raw.get("parameters") or {}
            if not isinstance(params, dict):
                raise _fail(f"input {name!r} parameters must be an object")
            if "binary_data_size" in params:
                if header_length is None:
                    raise _fail(f"input {name!r} has binary_data_size but the request has no "
                                "Inference-Header-Content-Length header")
                entry = _Binary(spec, shape, offset, params["binary_data_size"])
                plan.binary.append(entry)
                offset += entry.size
            elif "data" in raw:
                plan.json[name] = _from_json(raw["data"], shape, spec)
            else:
                raise _fail(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        plan.binary_bytes = offset
        if len(seen) != len(specs):
            raise _fail(f"missing inputs {sorted(set(specs) - seen)}; the model expects {sorted(specs)}")
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise _fail(f"'id' must be a string, got {type(request_id).__name__}")
        plan.id = request_id
        _decode_outputs(header, self.known_outputs, plan)
        return plan


PLANS = 64  # binary-request headers a Decoder remembers
PLAN_HEADER_BYTES = 4096  # longest header it remembers


def decode_infer_request(body: bytes, header_length: int | None, inputs: Sequence[TensorSpec],
                         outputs: Sequence[TensorSpec], limits: Limits = NO_LIMITS) -> InferRequest:
    """Decode and validate an inference request for a model with these ``inputs`` and ``outputs``.

    ``header_length`` is the ``Inference-Header-Content-Length`` (binary extension), else ``None``.
    Raises :class:`InvalidInput` naming what was expected and what arrived, :class:`TooLarge` for a limit.
    A server decodes with one :class:`Decoder` per model, which remembers repeated binary headers.
    """
    return Decoder(inputs, outputs, limits).decode(body, header_length)


def _decode_outputs(header: Mapping[str, Any], known: set[str], request: _Plan) -> None:
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail("request parameters must be an object")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _fail(f"parameters.binary_data_output must be true or false, got {binary_default!r:.40}")
    raw_outputs = header.get("outputs")
    if raw_outputs is None:
        request.binary_outputs = set(known) if binary_default else set()
        return
    if not isinstance(raw_outputs, list):
        raise _fail("'outputs' must be a list")
    names: list[str] = []
    for raw in raw_outputs:
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or name not in known:
            raise _fail(f"unknown output {name!r:.80}; the model has {sorted(known)}")
        out_params = raw.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise _fail(f"output {name!r} parameters must be an object")
        binary = out_params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _fail(f"output {name!r} parameters.binary_data must be true or false, got {binary!r:.40}")
        if binary:
            request.binary_outputs.add(name)
        names.append(name)
    request.outputs = names


def _json_data(array: np.ndarray) -> Any:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind not in "biuf":  # strings (BYTES outputs): plain JSON strings
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()]
    return flat.astype(np.float32) if flat.dtype == np.float16 else flat  # float16 -> float32 is exact


def _binary_data(array: np.ndarray) -> bytes:
    if array.dtype.kind not in "biuf":  # BYTES: each element as a 4-byte little-endian length + its bytes
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1).tolist()]
        return b"".join(len(v).to_bytes(4, "little") + v for v in items)
    if _LITTLE_ENDIAN and array.dtype.isnative:  # tobytes() is C order: one copy
        return array.tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> tuple[bytes, int | None]:
    """Encode the response body; the second value is the JSON header length when binary outputs follow."""
    names = request.outputs if request.outputs is not None else outputs
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        array = outputs[name]
        for spec in specs:  # (a model has a few outputs: a scan, not a dict built per response)
            if spec.name == name:
                datatype = spec.datatype or _datatype_of(array)
                break
        else:
            datatype = _datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            blob = _binary_data(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype:
            return name
    return "BYTES"


def decode_instances(instances: list[Any], spec: TensorSpec, limits: Limits = NO_LIMITS) -> np.ndarray:
    """KServe v1 ``instances`` (one entry per row) as one batch for input ``spec``.

    The rows are checked before the array is built, its elements and bytes right after (the JSON
    already parsed bounds them).
    """
    dtype = DATATYPES.get(spec.datatype)
    if dtype is None:
        raise _fail(f"input {spec.name!r} has datatype {spec.datatype}, which this server does not accept")
    limits.check_tensor(spec.name, (len(instances),), dtype)
    array = _as_array(instances, spec, "instances")
    _check_shape(array.shape, spec)
    limits.check_tensor(spec.name, array.shape, dtype)
    return array
