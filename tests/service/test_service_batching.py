"""The batcher coalesces compatible requests, returns each caller its own rows, bounds its queue."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service import batching
from service.batching import Batcher
from service.errors import InvalidInput, ModelNotReady, Overloaded


class Recorder:
    """A fake model: output = input * 2 (+ row sums), recording the batch sizes it ran."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.runs: list[int] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(60)
        x = feeds["x"]
        if np.any(x < 0):
            raise RuntimeError("negative input")
        self.runs.append(x.shape[0])
        return [x * 2, x.reshape(x.shape[0], -1).sum(axis=1)]


class Observer:
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.waits: list[float] = []

    def batch(self, rows: int, queue_seconds: list[float]) -> None:
        self.rows.append(rows)
        self.waits.extend(queue_seconds)


def _make(run: Recorder, observer: Observer | None = None, **options: object) -> Batcher:
    settings: dict[str, object] = {"batches": True, "max_batch_size": 8, "max_queue_delay_s": 0.0,
                                   "max_queue_size": 64}
    settings.update(options)
    return Batcher("test", run, observer=observer, **settings)  # type: ignore[arg-type]


async def _submit_all(batcher: Batcher, inputs: list[np.ndarray]) -> list[list[np.ndarray] | BaseException]:
    return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs), return_exceptions=True)


async def _blocked_then_rest(batcher: Batcher, run: Recorder, gate: threading.Event,
                             inputs: list[np.ndarray]) -> list[list[np.ndarray] | BaseException]:
    """Submit the first input, wait until the worker is inside its run, queue the rest, then release."""
    first = asyncio.ensure_future(_submit_all(batcher, inputs[:1]))
    while not run.started.is_set():
        await asyncio.sleep(0.005)
    rest = asyncio.ensure_future(_submit_all(batcher, inputs[1:]))
    while batcher.queued < len(inputs) - 1:
        await asyncio.sleep(0.005)
    gate.set()
    return [*await first, *await rest]


def test_coalesces_and_splits_rows() -> None:
    gate = threading.Event()
    run, observer = Recorder(gate), Observer()
    batcher = _make(run, observer)
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0, 1, (int(n), 3)).astype(np.float32) for n in (1, 2, 1, 3, 1, 1)]

    results = asyncio.run(_blocked_then_rest(batcher, run, gate, inputs))
    batcher.close()
    for x, result in zip(inputs, results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result[0], x * 2)
        np.testing.assert_array_equal(result[1], x.sum(axis=1))
    assert run.runs == [1, 8]  # the first ran alone; the other seven rows ran together
    assert observer.rows == run.runs and len(observer.waits) == 6


@pytest.mark.parametrize(("options", "expected"), [
    pytest.param({"max_batch_size": 2}, [1, 2, 2, 1], id="max-batch-size"),
    pytest.param({"batches": False}, [1, 1, 1, 1, 1, 1], id="no-batch-dimension"),
])
def test_batch_limits(options: dict[str, object], expected: list[int]) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run, **options)
    inputs = [np.full((1, 2), i, np.float32) for i in range(6)]

    for x, result in zip(inputs, asyncio.run(_blocked_then_rest(batcher, run, gate, inputs)), strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result[0], x * 2)
    batcher.close()
    assert run.runs == expected


def test_different_row_shapes_are_not_mixed() -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run)
    inputs = [np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), np.ones((1, 3), np.float32),
              np.ones((1, 3), np.float32)]

    for x, result in zip(inputs, asyncio.run(_blocked_then_rest(batcher, run, gate, inputs)), strict=True):
        assert not isinstance(result, BaseException)
        assert result[0].shape == x.shape
    batcher.close()
    assert run.runs == [1, 1, 2]


def test_bad_input_fails_only_itself() -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run)
    inputs = [np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32),
              np.ones((1, 2), np.float32)]

    results = asyncio.run(_blocked_then_rest(batcher, run, gate, inputs))
    batcher.close()
    assert run.runs[-1] == 1  # after the failed coalesced run, each request was retried alone
    assert isinstance(results[2], InvalidInput) and "negative input" in str(results[2])
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 2)


def test_queue_is_bounded() -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run, max_queue_size=2)

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}))
        while not run.started.is_set():  # the worker holds the first; the queue is empty again
            await asyncio.sleep(0.005)
        rest = asyncio.ensure_future(_submit_all(batcher, [np.ones((1, 2), np.float32)] * 3))
        await asyncio.sleep(0.02)
        gate.set()
        return [await first, *await rest]

    results = asyncio.run(scenario())
    batcher.close()
    assert [type(r).__name__ for r in results] == ["list", "list", "list", "Overloaded"]
    assert isinstance(results[3], Overloaded) and "max_queue_size" in str(results[3])


def test_queue_delay_waits_for_more_rows() -> None:
    run = Recorder()
    batcher = _make(run, max_queue_delay_s=1.0)  # wide: a loaded machine may be slow to submit the second

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}))
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    batcher.close()
    assert run.runs == [2]


def test_worker_survives_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = _make(Recorder())

    def broken(batch: list[object]) -> None:
        raise ZeroDivisionError("bookkeeping bug")

    monkeypatch.setattr(batcher, "_release", broken)  # after the worker collected its batch

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        batcher._row_seconds = None  # type: ignore[attr-defined]  # no estimate: every batch goes to the worker
        return await _submit_all(batcher, [np.ones((1, 2), np.float32)] * 2)

    first = asyncio.run(scenario())
    second = asyncio.run(scenario())  # the worker is still there to answer
    batcher.close()
    assert all(isinstance(r, RuntimeError) and "bookkeeping bug" in str(r) for r in first + second)


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
def test_an_observer_bug_is_logged_and_costs_no_answers(monkeypatch: pytest.MonkeyPatch, inline: bool) -> None:
    """The observer runs on the requests' loop thread before their answers (so metrics need no lock)."""
    threads: list[int] = []

    class Broken:
        def batch(self, rows: int, queue_seconds: list[float]) -> None:
            threads.append(threading.get_ident())
            raise ZeroDivisionError("observer bug")

    logged: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(batching, "event", lambda level, message, **fields: logged.append((message, fields)))
    batcher = _make(Recorder(), observer=Broken())  # type: ignore[arg-type]

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        batcher._row_seconds = 1e-6 if inline else None  # type: ignore[attr-defined]
        return await _submit_all(batcher, [np.ones((1, 2), np.float32)] * 2)

    results = asyncio.run(scenario())
    batcher.close()
    assert all(not isinstance(r, BaseException) and np.array_equal(r[0], np.full((1, 2), 2.0)) for r in results)
    assert threads and set(threads) == {threading.get_ident()}
    assert logged and logged[0] == ("internal error", {"where": "batch observer",
                                                       "error": "ZeroDivisionError: observer bug"})


def test_queue_bytes_are_bounded() -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run, max_queue_bytes=12)  # one (1, 2) float32 request is 8 bytes

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}))
        while not run.started.is_set():  # running requests no longer count against the budget
            await asyncio.sleep(0.005)
        rest = asyncio.ensure_future(_submit_all(batcher, [np.ones((1, 2), np.float32)] * 2))
        await asyncio.sleep(0.02)
        gate.set()
        return [await first, *await rest]

    results = asyncio.run(scenario())
    batcher.close()
    assert [type(r).__name__ for r in results] == ["list", "list", "Overloaded"]
    assert "8 input bytes queued; 8 more would pass max_queue_bytes=12" in str(results[2])


def test_worker_survives_a_closed_caller_loop() -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _make(run)
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    loop.close()  # the caller's loop is gone before its result arrives
    from service.batching import _Item

    batcher._queue.put(_Item({"x": np.ones((1, 2), np.float32)}, 1, (), future, loop, 8))
    gate.set()
    results = asyncio.run(_submit_all(batcher, [np.ones((1, 2), np.float32)]))  # still answered
    batcher.close()
    assert not isinstance(results[0], BaseException)


def test_one_batch_answers_callers_on_different_event_loops() -> None:
    """A coalesced batch hands results to each caller's own loop (one wake-up per loop)."""
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher = Batcher("m", recorder, batches=True, max_batch_size=64, max_queue_delay_s=0.0, max_queue_size=8)
    results: dict[str, list[np.ndarray]] = {}

    def call(tag: str, x: np.ndarray) -> None:
        results[tag] = asyncio.run(batcher.submit({"x": x}))

    inputs = {"first": np.full((1, 2), 1.0, np.float32), "a": np.full((2, 2), 3.0, np.float32),
              "b": np.full((1, 2), 5.0, np.float32)}
    first = threading.Thread(target=call, args=("first", inputs["first"]))
    first.start()
    assert recorder.started.wait(60)  # the first run blocks: the next two queue up behind it
    others = [threading.Thread(target=call, args=(tag, inputs[tag])) for tag in ("a", "b")]
    for thread in others:
        thread.start()
    while batcher.queued < 2:
        threading.Event().wait(0.005)
    gate.set()
    for thread in (first, *others):
        thread.join(60)
    batcher.close()
    assert recorder.runs == [1, 3]
    for tag, x in inputs.items():
        np.testing.assert_array_equal(results[tag][0], x * 2)
        np.testing.assert_array_equal(results[tag][1], x.sum(axis=1))


class ThreadRecorder(Recorder):
    """A Recorder that also notes which thread ran each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.threads.append(threading.get_ident())
        return super().__call__(feeds)


async def _first_run(batcher: Batcher, x: np.ndarray) -> None:
    """One request on the worker (it sets the per-row estimate), then wait until the worker is idle again."""
    await batcher.submit({"x": x})
    for _ in range(6000):  # the worker forgets the batch just after answering it: up to 60 s on a loaded machine
        if not batcher._held:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker still holds its first batch")


def test_cheap_batches_run_inline_on_the_event_loop() -> None:
    """Once a run showed the model cheap, requests of one loop iteration run as one batch in the loop's thread."""
    run = ThreadRecorder()
    batcher = _make(run, inline_s=60.0)
    inputs = [np.full((1, 2), i, np.float32) for i in range(5)]

    async def scenario() -> tuple[int, list[list[np.ndarray] | BaseException]]:
        await _first_run(batcher, inputs[0])
        return threading.get_ident(), await _submit_all(batcher, inputs)

    loop_thread, results = asyncio.run(scenario())
    batcher.close()
    for x, result in zip(inputs, results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result[0], x * 2)
    assert run.runs == [1, 5]
    assert run.threads[0] != loop_thread and run.threads[1] == loop_thread


@pytest.mark.parametrize("options", [
    pytest.param({"inline_s": 0.0}, id="inline-off"),
    pytest.param({"inline_s": 60.0, "max_queue_delay_s": 0.001}, id="queue-delay-set"),
])
def test_batches_stay_on_the_worker_when_inline_is_off(options: dict[str, object]) -> None:
    run = ThreadRecorder()
    batcher = _make(run, **options)

    async def scenario() -> int:
        await batcher.submit({"x": np.ones((1, 2), np.float32)})
        await _submit_all(batcher, [np.ones((1, 2), np.float32)] * 3)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    batcher.close()
    assert loop_thread not in run.threads and sum(run.runs) == 4


def test_an_inline_batch_with_a_bad_input_fails_only_itself() -> None:
    run = ThreadRecorder()
    batcher = _make(run, inline_s=60.0)
    inputs = [np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32), np.ones((1, 2), np.float32)]

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        await _first_run(batcher, inputs[0])
        return await _submit_all(batcher, inputs)

    results = asyncio.run(scenario())
    batcher.close()
    assert isinstance(results[1], InvalidInput) and "negative input" in str(results[1])
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)


def test_requests_collected_for_an_inline_run_count_against_the_queue_bound() -> None:
    run = ThreadRecorder()
    batcher = _make(run, inline_s=60.0, max_queue_size=2)

    async def scenario() -> list[list[np.ndarray] | BaseException]:
        await _first_run(batcher, np.ones((1, 2), np.float32))
        return await _submit_all(batcher, [np.ones((1, 2), np.float32)] * 3)

    results = asyncio.run(scenario())
    batcher.close()
    assert [type(r).__name__ for r in results] == ["list", "list", "Overloaded"]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "worker"])
def test_enqueue_answers_each_callback_once_and_a_failing_callback_does_not_stop_the_batch(
        inline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callbacks get their own rows, on the loop's thread; one that raises is logged, the others still run."""
    logged: list[dict[str, object]] = []
    monkeypatch.setattr("service.batching.event", lambda level, message, **fields: logged.append(fields))
    batcher = _make(Recorder())

    async def main() -> list[tuple[int, object, int]]:
        if inline:  # a first run gives the per-row estimate that lets batches run on the loop
            await batcher.submit({"x": np.ones((1, 2), np.float32)})
        loop = asyncio.get_running_loop()
        everyone = loop.create_future()
        got: list[tuple[int, object, int]] = []

        def callback(k: int) -> object:
            def done(result: object) -> None:
                got.append((k, result, threading.get_ident()))
                if len(got) == 4:
                    everyone.set_result(None)
                if k == 1:
                    raise RuntimeError("a bug in the caller's callback")
            return done

        for k in range(4):
            batcher.enqueue({"x": np.full((1, 2), k, np.float32)}, callback(k))
        await asyncio.wait_for(everyone, 30)
        await asyncio.sleep(0.01)  # nothing more arrives
        return got

    try:
        got = asyncio.run(main())
    finally:
        batcher.close()
    assert sorted(k for k, _, _ in got) == [0, 1, 2, 3]
    assert {ident for _, _, ident in got} == {threading.get_ident()}
    for k, result, _ in got:
        assert isinstance(result, list)
        np.testing.assert_array_equal(result[0], np.full((1, 2), 2 * k, np.float32))
    assert [f["error"] for f in logged] == ["RuntimeError: a bug in the caller's callback"]


def test_enqueue_refuses_synchronously_and_never_calls_back() -> None:
    batcher = _make(Recorder(), max_queue_size=1)
    batcher.close()
    called: list[object] = []

    async def main() -> None:
        with pytest.raises(ModelNotReady, match="not ready"):
            batcher.enqueue({"x": np.ones((1, 2), np.float32)}, called.append)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert called == []
