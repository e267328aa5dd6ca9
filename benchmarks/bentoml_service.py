"""BentoML serving the same folded ONNX files with onnxruntime and adaptive batching (a comparison point).

Runs only in its own virtual environment (``benchmarks/.venv-bentoml``, created by serving.py) so
that BentoML's pins never touch bnfold's environment. One service, one API per model; the ONNX
paths come from ``BENCH_RESNET_ONNX`` and ``BENCH_CNN_ONNX``. onnxruntime gets the same session
settings as ``bnfold serve`` (all graph optimizations, 1 intra-op thread, no spinning).

Run: ``bentoml serve benchmarks.bentoml_service:OnnxModels --port 8002`` from the repository root.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 1024})
class OnnxModels:
    def __init__(self) -> None:
        self.resnet = _session(os.environ["BENCH_RESNET_ONNX"])
        self.cnn = _session(os.environ["BENCH_CNN_ONNX"])

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1000)
    def resnet_infer(self, input: np.ndarray) -> np.ndarray:
        return self.resnet.run(None, {"input": input.astype(np.float32, copy=False)})[0]

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1000)
    def cnn_infer(self, input: np.ndarray) -> np.ndarray:
        return self.cnn.run(None, {"input": input.astype(np.float32, copy=False)})[0]
