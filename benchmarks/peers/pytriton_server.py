"""Triton Inference Server through PyTriton: a Python-backend model per ONNX file, with Triton's dynamic batcher.

Configured as PyTriton's documentation recommends for throughput: ``@batch`` inference callables,
``max_batch_size`` 64 and the dynamic batcher (no queue delay: requests already queued are batched),
one model instance (the server has one CPU). Triton speaks the Open Inference Protocol over HTTP,
JSON or binary tensor data, at ``/v2/models/{name}/infer``.

Run (from the repository root, in the PyTriton venv): ``python -m benchmarks.peers.pytriton_server
--port 8003 --model cnn=cnn.onnx``. The Python stub process loads the system libpython unless
``LD_LIBRARY_PATH`` holds this interpreter's ``LIBDIR``; the benchmark sets it.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.peers import parse_models, session


def _infer(path: str) -> Any:
    sess = session(path)
    output = sess.get_outputs()[0].name

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:
        return {output: sess.run([output], {"input": input.astype(np.float32, copy=False)})[0]}

    return infer, sess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ONNX")
    args = parser.parse_args()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_port=args.port + 1,
                          metrics_port=args.port + 2, log_verbose=0, exit_on_error=True)
    with Triton(config=config) as triton:
        for name, path in parse_models(args.model).items():
            infer, sess = _infer(path)
            inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
            triton.bind(model_name=name, infer_func=infer,
                        inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
                        outputs=[Tensor(name=out.name, dtype=np.float32, shape=tuple(out.shape[1:]))],
                        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
                        strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
