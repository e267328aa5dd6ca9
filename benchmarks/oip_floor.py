"""The floor of Python inference serving: the cheapest Open Inference Protocol server we could write.

It answers ``POST /v2/models/{name}/infer`` for FP32 models with one input and one output, JSON or
binary tensor data, and nothing else. It does only what every such server must do: parse HTTP
(httptools, C), parse the JSON (as ``bnfold serve`` does: :func:`service.codec.loads_body`, simdjson for a
large body's tensor data, orjson for the rest), build the input array, batch the requests for one model
that arrived in one event-loop iteration into one onnxruntime run on the loop's own thread (with
``bnfold serve``'s session settings), and write each answer with one ``write``. It has no checks at
all: no auth, no limits, no deadlines, no metrics, no error answers, no worker thread (a batch blocks
the loop). It is not a server anyone should run; it is the measured bound of what a Python server on
one core can reach, so that ``benchmarks/serving.py`` can tell overhead bnfold could still remove from
overhead no Python server can.

With ``--checks`` it also makes, per request, the checks ``bnfold serve`` makes, with the service's own
functions and defaults: the header size and body size limits, the API key check, the model name, the
byte budget (:class:`service.api.admission.Share`), the request deadline (:class:`~service.api.admission.
Deadlines`, swept), the request's validation and limits (:class:`service.codec.Decoder`), the response
(:func:`service.codec.encode_infer_response`, which validates the requested outputs), the metrics
(:class:`service.metrics.ServiceMetrics`: the request, its latency, queue time and batch size), and
``{"error": ...}`` answers for a service error. What it still leaves out is ``bnfold serve``'s
structure: uvicorn's protocol (keep-alive, pipelining, read timeouts, shutdown), FastAPI for the
other routes, the worker thread for slow batches, model versions and their leases. The distance from
this floor to ``bnfold serve`` is what that structure costs; from the plain floor, what the checks cost.

Run: ``python benchmarks/oip_floor.py [--checks] PORT NAME=MODEL.onnx ...``; ``GET`` of any path answers 200
(readiness).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import codec, jsondata
from service.runtime import ModelRuntime

_OK = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d%s\r\n\r\n"


class Floor:
    """One model, its session and the requests waiting for this loop iteration's batch."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.runtime = ModelRuntime(path, threads=1)
        self.input = self.runtime.inputs[0].name
        self.output = self.runtime.output_names[0]
        self.pending: list[tuple[_Connection, np.ndarray, bool]] = []

    def submit(self, connection: _Connection, array: np.ndarray, binary: bool) -> None:
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append((connection, array, binary))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        batch = np.concatenate([array for _, array, _ in pending]) if len(pending) > 1 else pending[0][1]
        (out,) = self.runtime.session.run([self.output], {self.input: batch})
        row = 0
        for connection, array, binary in pending:
            part = out[row:row + len(array)]
            row += len(array)
            output: dict[str, Any] = {"name": self.output, "datatype": "FP32", "shape": list(part.shape)}
            if binary:
                raw = part.tobytes()
                output["parameters"] = {"binary_data_size": len(raw)}
                header = orjson.dumps({"model_name": self.name, "outputs": [output]})
                head = _OK % (b"application/octet-stream", len(header) + len(raw),
                              b"\r\ninference-header-content-length: %d" % len(header))
                connection.transport.write(b"".join((head, header, raw)))
            else:
                output["data"] = part.reshape(-1)
                body = orjson.dumps({"model_name": self.name, "outputs": [output]},
                                    option=orjson.OPT_SERIALIZE_NUMPY)
                connection.transport.write(_OK % (b"application/json", len(body), b"") + body)


class _Connection(asyncio.Protocol):
    def __init__(self, floors: dict[bytes, Floor]) -> None:
        import httptools

        self.floors = floors  # inference path -> its model
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.url = b""
        self.body: list[bytes] = []
        self.header_length: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.body, self.header_length = b"", [], None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = int(value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_method() != b"POST":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return
        floor, body = self.floors[self.url], b"".join(self.body)
        if self.header_length is None:
            spec = codec.loads_body(body)["inputs"][0]
            data = spec["data"]
            array = data.floats.astype(np.float32) if isinstance(data, jsondata.Numbers) and data.floats is not None \
                else np.asarray(data, np.float32)
            floor.submit(self, array.reshape(spec["shape"]), False)
        else:
            spec = orjson.loads(body[:self.header_length])["inputs"][0]
            floor.submit(self, np.frombuffer(body, np.float32, offset=self.header_length).reshape(spec["shape"]),
                         True)


class _Checks:
    """What ``--checks`` adds (see the module docstring): the service's checks, with its default settings."""

    def __init__(self) -> None:
        from service.api.admission import Budget, Deadlines
        from service.config import Settings
        from service.metrics import ServiceMetrics

        settings = self.settings = Settings()  # type: ignore[call-arg]  # BNFOLD_* variables apply, as to serve
        self.limits = codec.Limits(settings.max_request_rows, settings.max_tensor_elements, settings.max_tensor_bytes,
                                   settings.max_json_bytes)
        self.budget = Budget(settings.max_inflight_bytes)
        self.deadlines = Deadlines(settings.request_timeout_s)
        self.metrics = ServiceMetrics()


class _Checked:
    """One checked request: its deadline entry and byte share, answered once."""

    __slots__ = ("answered", "checks", "connection", "request", "share", "started")

    def __init__(self, connection: _CheckedConnection, checks: _Checks) -> None:
        from service.api.admission import Share

        self.connection, self.checks = connection, checks
        self.share = Share(checks.budget)
        self.answered = False
        self.request: codec.InferRequest | None = None
        self.started = time.perf_counter()
        checks.deadlines.add(self, time.monotonic())

    def done(self) -> bool:
        return self.answered

    def cancel(self) -> None:
        from service.api.fastpath import late_message

        self.error(504, late_message(True, self.checks.deadlines.timeout_s))

    def error(self, status: int, message: str) -> None:
        self.checks.metrics.http_error(status)
        body = orjson.dumps({"error": message})
        self.answer(_OK.replace(b"200 OK", b"%d Error" % status) % (b"application/json", len(body), b"") + body)

    def answer(self, data: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        self.checks.deadlines.remove(self)
        self.share.release()
        self.connection.transport.write(data)


class CheckedFloor(Floor):
    """:class:`Floor` with the service's checks (``--checks``)."""

    def __init__(self, name: str, path: Path, checks: _Checks) -> None:
        super().__init__(name, path)
        self.checks = checks
        self.decoder = self.runtime.decoder(checks.limits)
        self.observer = checks.metrics.observer(name)
        self.queue: list[_Checked] = []

    def enqueue(self, call: _Checked) -> None:
        if not self.queue:
            asyncio.get_running_loop().call_soon(self.run_queued)
        self.queue.append(call)

    def run_queued(self) -> None:
        from service.errors import ServiceError

        queue, self.queue = self.queue, []
        start = time.perf_counter()
        self.observer.batch(len(queue), [start - call.started for call in queue])
        try:
            inputs = [call.request.inputs[self.input] for call in queue]  # type: ignore[union-attr]
            outputs = self.runtime.run({self.input: np.concatenate(inputs) if len(inputs) > 1 else inputs[0]})
        except Exception as exc:  # onnxruntime refused the batch
            for call in queue:
                call.error(400, f"onnxruntime could not run this input: {exc}")
            return
        row = 0
        metrics = self.checks.metrics
        for call, array in zip(queue, inputs, strict=True):
            named = {name: out[row:row + len(array)] for name, out in zip(self.runtime.output_names, outputs,
                                                                          strict=True)}
            row += len(array)
            try:
                body, header_length = codec.encode_infer_response(self.name, "1", call.request,  # type: ignore[arg-type]
                                                                  named, self.runtime.outputs)
            except ServiceError as exc:
                call.error(400, str(exc))
                continue
            metrics.request(self.name, "success", time.perf_counter() - call.started)
            if header_length is None:
                call.answer(_OK % (b"application/json", len(body), b"") + body)
            else:
                call.answer(_OK % (b"application/octet-stream", len(body),
                                   b"\r\ninference-header-content-length: %d" % header_length) + body)


class _CheckedConnection(_Connection):
    """:class:`_Connection` with the header and body size limits, the API key and the request checks."""

    def __init__(self, floors: dict[bytes, Floor], checks: _Checks) -> None:
        super().__init__(floors)
        self.checks = checks
        self.head_bytes = 0
        self.authorization = b""
        self.length_header: bytes | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes, self.authorization, self.length_header = 0, b"", None

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        name = name.lower()
        if name == b"authorization":
            self.authorization = value
        elif name == b"inference-header-content-length":
            self.length_header = value

    def on_message_complete(self) -> None:
        from fastapi import HTTPException

        from service.api.deps import check_api_key
        from service.api.errors import OUTCOME, http_error
        from service.errors import ModelNotFound, ServiceError
        from service.metrics import UNKNOWN_MODEL

        if self.parser.get_method() != b"POST":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return
        checks = self.checks
        settings = checks.settings
        call = _Checked(self, checks)
        body = b"".join(self.body)
        floor = None
        try:
            if self.head_bytes > settings.max_header_bytes:
                raise HTTPException(431, "headers too large")
            if len(body) > settings.max_body_bytes:
                raise HTTPException(413, "body too large")
            check_api_key(settings, self.authorization)
            floor = self.floors.get(self.url)
            if not isinstance(floor, CheckedFloor):
                raise ModelNotFound("unknown model")
            call.share.take(len(body))
            length = codec.parse_header_length(None if self.length_header is None else
                                               self.length_header.decode("latin-1"), len(body))
            json_length = len(body) if length is None else length
            checks.limits.check_json(json_length)
            call.share.take_decoding(len(body), json_length)
            call.request = floor.decoder.decode(body, length)
        except HTTPException as exc:
            call.error(exc.status_code, str(exc.detail))
            return
        except ServiceError as exc:  # as bnfold counts it: by model (bounded labels) and outcome
            error = http_error(exc)
            label = floor.name if isinstance(floor, CheckedFloor) else UNKNOWN_MODEL
            checks.metrics.request(label, OUTCOME.get(error.status_code, "error"))
            call.error(error.status_code, str(error.detail))
            return
        floor.enqueue(call)


def main(argv: list[str]) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    checked = argv[:1] == ["--checks"]
    argv = argv[1:] if checked else argv
    loop = asyncio.new_event_loop()
    checks = _Checks() if checked else None
    floors: dict[bytes, Floor] = {}
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        floors[f"/v2/models/{name}/infer".encode()] = Floor(name, Path(path)) if checks is None else \
            CheckedFloor(name, Path(path), checks)

    async def serve() -> None:
        if checks is not None:
            checks.deadlines.start()
        server = await loop.create_server(lambda: _Connection(floors) if checks is None else
                                          _CheckedConnection(floors, checks), "127.0.0.1", int(argv[0]), backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
