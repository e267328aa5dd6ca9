"""Red-team checks of the inference hot-path speed-ups (deferred metrics, the codec's Decoder and its plans,
the lazy ASGI scope, the remembered direct routes, the header dict of a call).

The tests under "defects" pinned what the red-team pass found (strict xfails until fixed); the others cover
what was checked and found right, where the existing tests do not already.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service import codec, protocol
from service.api import fastpath
from service.batching import Batcher, _Item
from service.config import Settings
from service.main import create_app
from service.metrics import LATENCY_BUCKETS, ServiceMetrics, _PendingHistogram

T = codec.TensorSpec
INPUTS = [T("a", "FP32", [-1, 2]), T("b", "INT64", [-1]), T("c", "BOOL", [-1])]
OUTPUTS = [T("y", "FP32", [-1]), T("z", "FP32", [-1])]


def _binary(entries: list[tuple[str, str, list[int], bytes]], **extra: Any) -> tuple[bytes, int]:
    """A binary request: (name, datatype, shape, raw bytes) per input, in that order."""
    header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(r)}}
                                    for n, d, s, r in entries], **extra}).encode()
    return header + b"".join(r for *_, r in entries), len(header)


def _outcome(decode: Any) -> Any:
    """What a decode gives, comparably: the exception's type, or the request's content (input order included)."""
    try:
        request = decode()
    except Exception as exc:
        return type(exc).__name__
    return ([(k, v.dtype.str, v.shape, v.tolist()) for k, v in request.inputs.items()], request.id, request.outputs,
            sorted(request.binary_outputs))


def _random_request(rng: random.Random) -> tuple[bytes, int | None]:
    """A request for INPUTS/OUTPUTS, valid or slightly wrong in one of many ways."""
    kinds = {"a": ("FP32", np.float32, 2), "b": ("INT64", np.int64, 1), "c": ("BOOL", np.bool_, 1)}
    names = rng.sample(list(kinds), rng.choice([1, 2, 3, 3, 3]))
    if rng.random() < 0.05:
        names.append(names[0])
    inputs, blobs = [], []
    for name in names:
        datatype, dtype, width = kinds[name]
        rows = rng.choice([0, 1, 2, 3, 5])
        shape = [rows, width] if name == "a" and rng.random() > 0.05 else [rows]
        entry: dict[str, Any] = {"name": name, "datatype": datatype if rng.random() > 0.05 else "FP64", "shape": shape}
        array = (np.arange(math.prod(shape)) % 3).astype(dtype)
        if name == "a" and array.size and rng.random() < 0.15:
            array[rng.randrange(array.size)] = np.nan
        if rng.random() < 0.6:
            blob = array.tobytes()
            size = len(blob) + (rng.choice([-4, 4, 1]) if rng.random() < 0.1 else 0)
            entry["parameters"] = {"binary_data_size": size}
            blobs.append(blob[:-1] if blob and rng.random() < 0.1 else blob)
        else:
            entry["data"] = array.tolist()
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if rng.random() < 0.3:
        header["id"] = rng.choice(["x", "y", 3])
    if rng.random() < 0.3:
        header["outputs"] = [{"name": rng.choice(["y", "z", "q"]), "parameters": {"binary_data": rng.random() < 0.5}}]
    if rng.random() < 0.3:
        header["parameters"] = {"binary_data_output": rng.choice([True, False, 1])}
    encoded = json.dumps(header).encode()
    if not blobs and rng.random() < 0.3:
        return encoded, None
    return encoded + b"".join(blobs) + (b"\0" * 4 if rng.random() < 0.05 else b""), len(encoded)


# -- codec.Decoder: defects --------------------------------------------------------------------------------


def test_a_request_wrong_in_its_header_and_its_body_gets_the_headers_error() -> None:
    """The Decoder checks what the header declares (here a later input's size limit) before the body's bytes
    (here a NaN in the first input): 413, not 400, remembered or not. Before it, inputs were checked in
    request order with their data, and the same request got 400; either is a refusal, this order is documented."""
    nan = np.array([[np.nan, 1.0]], np.float32).tobytes()
    body, length = _binary([("a", "FP32", [1, 2], nan), ("b", "INT64", [9], np.zeros(9, np.int64).tobytes()),
                            ("c", "BOOL", [1], b"\x01")])
    limits = codec.Limits(max_rows=64, max_elements=8, max_bytes=1024, max_json_bytes=4096)
    decoder = codec.Decoder(INPUTS, OUTPUTS, limits)
    for _ in range(2):
        with pytest.raises(codec.TooLarge):
            decoder.decode(body, length)


def test_a_bytearray_body_decodes_as_its_bytes_do() -> None:
    body, length = _binary([("a", "FP32", [1, 2], np.ones((1, 2), np.float32).tobytes()),
                            ("b", "INT64", [1], np.ones(1, np.int64).tobytes()), ("c", "BOOL", [1], b"\x01")])
    expected = _outcome(lambda: codec.decode_infer_request(body, length, INPUTS, OUTPUTS))
    assert _outcome(lambda: codec.decode_infer_request(bytearray(body), length, INPUTS, OUTPUTS)) == expected


# -- codec.Decoder: checked and right ------------------------------------------------------------------------


def test_a_warm_decoder_answers_every_request_as_a_fresh_one() -> None:
    """Random valid and invalid requests, many sharing headers with different bodies: one long-lived Decoder
    (its plans remembered, cleared past PLANS) gives the outcome of a fresh decode, request by request."""
    rng = random.Random(7)
    limits = codec.Limits(max_rows=4, max_elements=8, max_bytes=40, max_json_bytes=2000)
    warm = codec.Decoder(INPUTS, OUTPUTS, limits)
    requests = [_random_request(rng) for _ in range(600)]
    requests += [(body[:length] + bytes(reversed(body[length:])), length) for body, length in requests[:200]
                 if length is not None]  # the same headers with other binary data (NaN moved, bools changed)
    for body, length in requests:
        fresh = _outcome(lambda b=body, n=length: codec.Decoder(INPUTS, OUTPUTS, limits).decode(b, n))
        assert _outcome(lambda b=body, n=length: warm.decode(b, n)) == fresh, (body, length)
        assert _outcome(lambda b=body, n=length: warm.decode(b, n)) == fresh, (body, length)  # from the plan
    assert len(warm._plans) <= codec.PLANS


def test_a_remembered_header_still_checks_each_body() -> None:
    ok = np.array([[1.0, 2.0]], np.float32).tobytes()
    bad = np.array([[np.inf, 2.0]], np.float32).tobytes()
    entries = [("b", "INT64", [1], np.ones(1, np.int64).tobytes()), ("c", "BOOL", [1], b"\x00")]
    body, length = _binary([("a", "FP32", [1, 2], ok), *entries])
    decoder = codec.Decoder(INPUTS, OUTPUTS)
    first = decoder.decode(body, length)
    np.testing.assert_array_equal(first.inputs["a"], [[1.0, 2.0]])
    with pytest.raises(codec.InvalidInput, match="not finite"):
        decoder.decode(body[:length] + bad + body[length + len(bad):], length)
    with pytest.raises(codec.InvalidInput, match="binary data"):
        decoder.decode(body[:-1], length)  # short
    with pytest.raises(codec.InvalidInput, match="add up to"):
        decoder.decode(body + b"\0", length)  # long
    assert decoder.decode(body, length).inputs["a"].tolist() == [[1.0, 2.0]]


def test_requests_from_one_plan_share_no_mutable_state() -> None:
    """What a caller does with one decoded request (its dicts, lists, sets) does not reach the next one."""
    body, length = _binary([("c", "BOOL", [2], b"\x01\x00"), ("a", "FP32", [1, 2], np.ones((1, 2), np.float32)
                                                                 .tobytes()), ("b", "INT64", [1], b"\0" * 8)],
                           id="r", outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    decoder = codec.Decoder(INPUTS, OUTPUTS)
    first = decoder.decode(body, length)
    assert list(first.inputs) == ["a", "b", "c"]  # the model's order, not the request's
    first.inputs.clear()
    assert first.outputs is not None
    first.outputs.append("z")
    first.binary_outputs.add("z")
    second = decoder.decode(body, length)
    assert list(second.inputs) == ["a", "b", "c"] and second.outputs == ["y"] and second.binary_outputs == {"y"}
    assert second.id == "r"
    assert second.inputs["c"].tolist() == [True, False]


def test_a_shared_decoder_is_right_from_many_threads() -> None:
    """The service decodes large requests in executor threads: one Decoder (plans added and cleared meanwhile)
    gives every thread its own request's values."""
    decoder = codec.Decoder(INPUTS, OUTPUTS)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for k in range(150):
                rows = (seed + k) % 3 + 1
                a = np.full((rows, 2), float(seed * 1000 + k), np.float32)
                body, length = _binary([("a", "FP32", [rows, 2], a.tobytes()),
                                        ("b", "INT64", [k % 70], np.full(k % 70, seed, np.int64).tobytes()),
                                        ("c", "BOOL", [1], b"\x01")])
                request = decoder.decode(body, length)
                assert request.inputs["a"].tolist() == a.tolist()
                assert request.inputs["b"].tolist() == [seed] * (k % 70)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    assert len(decoder._plans) <= codec.PLANS


def test_a_long_header_and_a_header_with_json_data_are_not_remembered() -> None:
    decoder = codec.Decoder(INPUTS, OUTPUTS)
    long_id = "x" * codec.PLAN_HEADER_BYTES
    body, length = _binary([("a", "FP32", [1, 2], b"\0" * 8), ("b", "INT64", [1], b"\0" * 8),
                            ("c", "BOOL", [1], b"\0")], id=long_id)
    assert decoder.decode(body, length).id == long_id
    header = json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
                                    {"name": "b", "datatype": "INT64", "shape": [1], "data": [3]},
                                    {"name": "c", "datatype": "BOOL", "shape": [1],
                                     "parameters": {"binary_data_size": 1}}]}).encode()
    first = decoder.decode(header + b"\x01", len(header))
    first.inputs["a"][0, 0] = 99.0  # a JSON input's array is the request's own
    assert decoder.decode(header + b"\x00", len(header)).inputs["a"].tolist() == [[1.0, 2.0]]
    assert not decoder._plans


# -- through the service ---------------------------------------------------------------------------------


def test_a_multi_input_binary_request_repeated_is_answered_right(client: TestClient) -> None:
    """The types model (one Identity per datatype): a binary request with its inputs in reverse order, sent
    three times (the header remembered), then with a NaN in the body (refused though the header is known)."""
    meta = client.get("/v2/models/types").json()
    entries = []
    for k, item in enumerate(reversed(meta["inputs"])):
        dtype = codec.DATATYPES[item["datatype"]]
        values = (np.arange(4).reshape(2, 2) + k).astype(dtype)
        entries.append((item["name"], item["datatype"], [2, 2], values.tobytes()))
    body, length = _binary(entries, parameters={"binary_data_output": False})
    headers = {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}
    for _ in range(3):
        answer = client.post("/v2/models/types/infer", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        for k, (name, datatype, _, raw) in enumerate(entries):
            expected = np.frombuffer(raw, codec.DATATYPES[datatype]).ravel().tolist()
            assert outputs["out_" + name[3:]] == expected, (k, name)
    fp32 = next(i for i, e in enumerate(entries) if e[1] == "FP32")
    offset = length + sum(len(e[3]) for e in entries[:fp32])
    poisoned = body[:offset] + np.float32(np.nan).tobytes() + body[offset + 4:]
    answer = client.post("/v2/models/types/infer", content=poisoned, headers=headers)
    assert answer.status_code == 400 and "not finite" in answer.json()["error"]


async def _asgi_post(app: Any, path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


JSON_BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                    "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()


def test_asgi_headers_given_as_an_iterable_are_read(settings: Settings) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(JSON_BODY)).encode())]
    status, _ = asyncio.run(_asgi_post(create_app(settings), "/v2/models/classifier/infer", iter(headers), JSON_BODY))
    assert status == 200


def test_the_first_of_a_repeated_header_wins(settings: Settings) -> None:
    raw = np.ones((1, 4), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    body = header + raw
    headers = [(b"content-length", str(len(body)).encode()),
               (b"inference-header-content-length", str(len(header)).encode()),
               (b"inference-header-content-length", b"3")]
    status, answer = asyncio.run(_asgi_post(create_app(settings), "/v2/models/classifier/infer", headers, body))
    assert status == 200, answer
    status, answer = asyncio.run(_asgi_post(create_app(settings), "/v2/models/classifier/infer",
                                            [headers[0], headers[2], headers[1]], body))
    assert status == 400, answer


# -- ServiceApp.direct_route and the protocol's default headers -------------------------------------------------


def test_remembered_direct_routes_are_bounded_and_equal_a_fresh_match(settings: Settings) -> None:
    app = create_app(settings)
    assert isinstance(app, fastpath.ServiceApp) and app.endpoints is not None
    paths = [f"/v2/models/m{k}/infer" for k in range(600)] + ["/v2/models/a/versions/2/infer", "/v1/models/a:predict",
                                                              "/metrics", "/v2/models//infer", "/v2/models/a/b/infer",
                                                              "/v2/models/" + "x" * 300 + "/infer"]
    for _ in range(2):
        for path in paths:
            route = app.direct_route(path)
            params = fastpath.match_inference(path)
            assert (route is None) == (params is None), path
            if route is not None:
                assert route[1] == params and route[0] == app.endpoints.serve
    assert len(app.endpoints.direct_routes) <= fastpath.ROUTES_KEPT
    assert all(len(p) <= fastpath.ROUTE_BYTES_KEPT for p in app.endpoints.direct_routes)


def test_the_default_head_is_uvicorns_headers_and_follows_a_new_list() -> None:
    def old(headers: list[tuple[bytes, bytes]]) -> bytes:
        return b"".join(b"".join([name, b": ", value, b"\r\n"]) for name, value in headers)

    first = [(b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"), (b"server", b"uvicorn"), (b"x-a", b"1")]
    second = [(b"date", b"Mon, 01 Jan 2024 00:00:01 GMT"), (b"server", b"uvicorn"), (b"x-a", b"1")]
    assert protocol._default_head(first) == old(first)
    assert protocol._default_head(second) == old(second)
    assert protocol._default_head(first) == old(first)
    assert protocol._default_head([]) == b""


# -- metrics -----------------------------------------------------------------------------------------------


def test_reloading_a_model_does_not_grow_the_metrics() -> None:
    metrics = ServiceMetrics()
    for _ in range(1000):  # the repository asks for an observer at every version load
        metrics.observer("m")
    assert len(metrics._pending) < 10


def test_a_nan_observation_lands_where_prometheus_client_puts_it() -> None:
    registry = CollectorRegistry()
    direct = Histogram("h", "x", buckets=LATENCY_BUCKETS, registry=registry)
    direct.observe(math.nan)
    deferred_registry = CollectorRegistry()
    deferred = Histogram("h", "x", buckets=LATENCY_BUCKETS, registry=deferred_registry)
    pending = _PendingHistogram(deferred, LATENCY_BUCKETS)
    pending.observe(math.nan)
    pending.flush()

    def buckets(r: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(r).decode().splitlines() if "_bucket" in line]

    assert buckets(deferred_registry) == buckets(registry)


def test_a_batch_is_observed_though_its_first_callers_loop_closed() -> None:
    """Before, the worker observed each batch itself; now the first request's loop does, and a closed one
    (its caller gone) takes the observation with it, though the batch's other callers are answered."""
    gate = threading.Event()
    started = threading.Event()
    rows: list[int] = []

    class Observer:
        def batch(self, n: int, queue_seconds: list[float]) -> None:
            rows.append(n)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        started.set()
        gate.wait(60)
        return [feeds["x"] * 2]

    batcher = Batcher("m", run, batches=True, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=8,
                      observer=Observer())
    x = np.ones((1, 2), np.float32)
    closed = asyncio.new_event_loop()
    closed.close()

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit({"x": x}))
        while not started.is_set():
            await asyncio.sleep(0.005)
        key = (("x", x.shape[1:], x.dtype),)
        batcher._queue.put(_Item({"x": x}, 1, key, lambda result: None, closed, x.nbytes))
        second = asyncio.ensure_future(batcher.submit({"x": x}))
        while batcher.queued < 2:
            await asyncio.sleep(0.005)
        gate.set()
        await first
        await second

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        batcher.close()
    assert rows == [1, 2]


def test_the_metrics_page_counts_each_request_once(client: TestClient) -> None:
    """Deferred counts reach /metrics once: a second read adds nothing, and new requests add theirs."""
    def samples() -> dict[str, float]:
        found = {}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(("bnfold_requests_total", "bnfold_batch_size_count",
                                "bnfold_queue_duration_seconds_count", "bnfold_request_duration_seconds_count")) \
                    and 'model="classifier"' in line:
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    for _ in range(3):
        assert client.post("/v2/models/classifier/infer", content=JSON_BODY).status_code == 200
    first = samples()
    assert samples() == first
    for _ in range(2):
        assert client.post("/v2/models/classifier/infer", content=JSON_BODY).status_code == 200
    second = samples()
    success = 'bnfold_requests_total{model="classifier",outcome="success"}'
    latency = 'bnfold_request_duration_seconds_count{model="classifier"}'
    queued = 'bnfold_queue_duration_seconds_count{model="classifier"}'
    assert second[success] - first[success] == 2 and second[latency] - first[latency] == 2
    assert second[queued] - first[queued] == 2
