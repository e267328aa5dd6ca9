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

Run: ``python benchmarks/oip_floor.py PORT NAME=MODEL.onnx ...``; ``GET`` of any path answers 200 (readiness).
"""

from __future__ import annotations

import asyncio
import sys
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


def main(argv: list[str]) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    floors = {}
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        floors[f"/v2/models/{name}/infer".encode()] = Floor(name, Path(path))
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: _Connection(floors), "127.0.0.1", int(argv[0]),
                                                        backlog=1024))
    print("ready", flush=True)
    try:
        loop.run_until_complete(server.serve_forever())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
