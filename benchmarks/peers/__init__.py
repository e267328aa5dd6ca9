"""Peer servers for the serving benchmark, each run from its own virtual environment (never bnfold's).

Every peer serves the same folded ONNX files as ``bnfold serve`` with onnxruntime and the same session
settings (:func:`session`), configured the way its own documentation recommends for throughput;
``benchmarks/serving.py`` starts each with the interpreter given on its command line and checks every
answer against in-process onnxruntime. This package imports nothing but numpy and onnxruntime, so that
each peer's environment needs only the peer itself.
"""

from __future__ import annotations

import onnxruntime as ort


def session(path: str) -> ort.InferenceSession:
    """An onnxruntime session as ``bnfold serve`` makes one: all graph optimizations, 1 thread, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def parse_models(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` arguments as a mapping."""
    return dict(spec.split("=", 1) for spec in specs)
