"""MLServer serving the ONNX files through a custom runtime (an ``MLModel`` around onnxruntime), adaptive batching.

MLServer has no onnxruntime runtime of its own, so :class:`OnnxModel` is the custom runtime its
documentation describes (``load`` and ``predict``, tensors through ``NumpyCodec``). Configured for
throughput as documented: adaptive batching (``max_batch_size`` 64, ``max_batch_time`` 2 ms) and
inference in the server process (``parallel_workers`` 0: the server has one CPU, and worker processes
would only add a hand-off). JSON only: MLServer does not accept the binary tensor data extension.
MLServer 1.7 needs ``uvloop==0.21``.

Run (from the repository root, in the MLServer venv): ``python -m benchmarks.peers.mlserver_server
--port 8004 --model cnn=cnn.onnx``: writes the settings files to a temporary folder, then starts
``mlserver start`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from benchmarks.peers import parse_models, session

ROOT = Path(__file__).resolve().parents[2]


class OnnxModel(MLModel):
    """One ONNX file in onnxruntime; ``parameters.uri`` is its path."""

    async def load(self) -> bool:
        self.session = session(str(self.settings.parameters.uri))
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.session.run([self.output], {"input": x})[0]
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(self.output, y)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ONNX")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-mlserver-"))
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": args.port, "grpc_port": args.port + 1, "metrics_port": args.port + 2,
        "parallel_workers": 0, "debug": False, "metrics_endpoint": None}))
    for name, path in parse_models(args.model).items():
        (folder / name).mkdir()
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "benchmarks.peers.mlserver_server.OnnxModel",
            "max_batch_size": 64, "max_batch_time": 0.002, "parameters": {"uri": str(Path(path).resolve())}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    exe = Path(sys.executable).parent / "mlserver"
    os.execve(str(exe), [str(exe), "start", str(folder)], env)


if __name__ == "__main__":
    main()
