"""LitServe serving the ONNX files with onnxruntime: one ``LitAPI`` per model, LitServe's dynamic batching.

Configured for throughput as LitServe's documentation recommends: ``max_batch_size`` 64 with a short
``batch_timeout`` (2 ms), ``batch``/``unbatch`` stacking the decoded requests into one array, one
inference worker on the CPU, and ``fast_queue`` (ZeroMQ between the API server and the worker).
Requests are LitServe's own JSON (``{"input": nested list}``), answered with the output as a JSON list.

Run (from the repository root, in the LitServe venv): ``python -m benchmarks.peers.litserve_server
--port 8006 --model cnn=cnn.onnx``; model ``NAME`` answers at ``/NAME/predict``.
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls
import numpy as np

from benchmarks.peers import parse_models, session


class OnnxAPI(ls.LitAPI):
    """One ONNX file in onnxruntime."""

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(**options)
        self.path = path

    def setup(self, device: str) -> None:
        self.session = session(self.path)
        self.output = self.session.get_outputs()[0].name

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # untyped: LitServe reads a JSON body
        return np.asarray(request["input"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {"input": x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output[:, None])

    def encode_response(self, output: np.ndarray) -> Any:
        return output.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ONNX")
    args = parser.parse_args()
    apis = [OnnxAPI(path, max_batch_size=64, batch_timeout=0.002, api_path=f"/{name}/predict")
            for name, path in parse_models(args.model).items()]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, fast_queue=True, track_requests=False)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
