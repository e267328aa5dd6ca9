"""KServe's Python ModelServer with one ``kserve.Model`` per ONNX file (Open Inference Protocol v2).

Configured as KServe's documentation describes a custom predictor: ``load`` and an async ``predict``
taking an ``InferRequest`` (JSON, or the binary tensor data extension) and returning an
``InferResponse`` (binary outputs when the request asks for them), one uvicorn worker (the server has
one CPU), no gRPC, no latency or access logging (``KSERVE_LOGLEVEL=WARNING``, set by the benchmark).
KServe's Python server has no in-process batcher: every request runs alone.

Run (from the repository root, in the KServe venv): ``python -m benchmarks.peers.kserve_server
--port 8005 --model cnn=cnn.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from benchmarks.peers import parse_models, session


class OnnxModel(kserve.Model):
    """One ONNX file in onnxruntime."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = session(self.path)
        self.output = self.session.get_outputs()[0].name
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        y = self.session.run([self.output], {"input": payload.inputs[0].as_numpy()})[0]
        out = InferOutput(name=self.output, shape=list(y.shape), datatype="FP32")
        binary = payload.use_binary_outputs
        out.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=binary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ONNX")
    args, _ = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # kserve parses the command line at import: give it its defaults
    models: list[Any] = [OnnxModel(name, path) for name, path in parse_models(args.model).items()]
    kserve.ModelServer(http_port=args.port, grpc_port=args.port + 1, workers=1, enable_grpc=False,
                       enable_docs_url=False, enable_latency_logging=False).start(models)


if __name__ == "__main__":
    main()
