"""The baseline a user would otherwise write by hand: FastAPI + PyTorch eager, the *unfolded* checkpoint,
one forward pass per request, stdlib JSON. It accepts the same Open Inference Protocol bodies as
``bnfold serve`` (JSON, or a JSON header plus raw FP32 bytes), so the load generator sends identical
requests to both; it skips validation a real service needs, which only flatters it.

Run: ``python benchmarks/naive_server.py --port 8001 --model cnn=path/to/cnn.pt --model resnet=...``
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from bnfold.checkpoint import load_model


def create_app(checkpoints: dict[str, str]) -> FastAPI:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the process is pinned to
    models = {name: load_model(path).model.eval() for name, path in checkpoints.items()}
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = await request.body()
        header_length = request.headers.get("inference-header-content-length")
        header: dict[str, Any] = json.loads(body[: int(header_length)] if header_length else body)
        spec = header["inputs"][0]
        if header_length:
            x = torch.from_numpy(np.frombuffer(body, np.float32, offset=int(header_length)).reshape(spec["shape"]))
        else:
            x = torch.tensor(spec["data"], dtype=torch.float32).reshape(spec["shape"])
        with torch.inference_mode():
            y = models[name](x)
        out = {"model_name": name, "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(y.shape),
                                                "data": y.reshape(-1).tolist()}]}
        return Response(json.dumps(out), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    args = parser.parse_args()
    checkpoints = dict(spec.split("=", 1) for spec in args.model)
    uvicorn.run(create_app(checkpoints), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
