"""Synchronized batch norm and the process-group helpers, with two real gloo processes.

Each test starts two spawned processes that join one gloo group (``bnfold.distributed.setup``
reads the torchrun variables), split a fixed batch between them, and send their results back.
The reference is one plain process seeing the whole batch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnfold import distributed, sync_batchnorm
from bnfold.errors import BnfoldError

WORLD = 2
DEADLINE_S = 240  # generous: two processes importing torch on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(worker: Any, out: Path, *args: Any) -> list[Any]:
    """Run ``worker(rank, out, *args)`` in WORLD spawned processes joined by torchrun's variables;
    return what each saved to ``out/<rank>.pt``. Fails (never hangs) if a process fails or stalls."""
    import torch.multiprocessing as mp

    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD))
    try:
        context = mp.start_processes(_entry, args=(worker, out, args), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"the {WORLD} processes did not finish in {DEADLINE_S} s")
    finally:
        for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
            os.environ.pop(key, None)
    return [torch.load(out / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _entry(rank: int, worker: Any, out: Path, args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    worker(rank, out, *args)


def _model(bn: str, momentum: float | None) -> nn.Module:
    torch.manual_seed(0)
    if bn == "2d":
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 3))
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=momentum), nn.ReLU(), nn.Linear(6, 3))


def _batch(bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (16, 3, 6, 6) if bn == "2d" else (16, 5)
    x = torch.randn(shape, generator=g) * 3 + 2  # far from normalized: the statistics matter
    return x, torch.randint(0, 3, (16,), generator=g)


SPLIT = (5, 11)  # unequal halves: counts must be summed, not averaged per rank
STEPS = 3


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    for _ in range(STEPS):
        out = model(x)
        # sum / global count * world: DDP averages gradients over ranks, giving the global mean's gradient
        loss = nn.functional.cross_entropy(out, y, reduction="sum") * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        outputs.append(out.detach())
    return outputs


CASES = {  # name -> (batch norm, momentum, synchronized)
    "BatchNorm2d": ("2d", 0.1, True),
    "BatchNorm1d": ("1d", 0.1, True),
    "BatchNorm2d-cumulative": ("2d", None, True),
    "BatchNorm2d-not-synchronized": ("2d", 0.1, False),
}


def _worker(rank: int, out: Path) -> None:
    """Every two-process case in one group (starting processes is what costs time here)."""
    from torch.nn.parallel import DistributedDataParallel

    context = distributed.setup(torch.device("cpu"), timeout_s=60)
    results: dict[str, Any] = {"backend": context.backend, "described": context.describe()}
    try:
        for name, (bn, momentum, sync) in CASES.items():
            x, y = _batch(bn)
            start = sum(SPLIT[:rank])
            part = slice(start, start + SPLIT[rank])
            model = _model(bn, momentum)
            if sync:
                model = sync_batchnorm.convert(model)
            outputs = _train(DistributedDataParallel(model), x[part], y[part], WORLD / len(x))
            bn_module = model[1]
            results[name] = {"running_mean": bn_module.running_mean, "running_var": bn_module.running_var,
                             "tracked": bn_module.num_batches_tracked, "outputs": outputs,
                             "params": [p.detach() for p in model.parameters()], "type": type(bn_module).__name__}
        results["sum"] = context.sum([rank, 1.5, 10.0 ** rank])
        try:
            context.agree(BnfoldError("destination not writable") if rank == 1 else None)
            results["agreed"] = "no error"
        except BnfoldError as exc:
            results["agreed"] = f"{type(exc).__name__}: {exc}"
        torch.save(results, out / f"{rank}.pt")
    finally:
        distributed.teardown(context)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks of :func:`_worker` saved."""
    return _spawn(_worker, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES if CASES[c][2]])
def test_sync_bn_equals_one_process_on_the_global_batch(ranks: list[dict[str, Any]], case: str) -> None:
    bn, momentum, _ = CASES[case]
    x, y = _batch(bn)
    reference = _model(bn, momentum)
    expected = _train(reference, x, y, 1 / len(x))
    ref_bn = reference[1]
    assert [r[case]["type"] for r in ranks] == ["CpuSyncBatchNorm"] * WORLD and ranks[0]["backend"] == "gloo"
    for rank, got in enumerate(r[case] for r in ranks):
        # float32 tolerance: the sums of 16 samples in another order
        torch.testing.assert_close(got["running_mean"], ref_bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["running_var"], ref_bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(got["tracked"]) == int(ref_bn.num_batches_tracked) == STEPS
        start = sum(SPLIT[:rank])
        for step in range(STEPS):  # each rank's outputs are its rows of the global batch's outputs
            torch.testing.assert_close(got["outputs"][step], expected[step][start:start + SPLIT[rank]],
                                       rtol=1e-5, atol=1e-5)
        for p, q in zip(got["params"], reference.parameters(), strict=True):  # so the gradients matched too
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-5)


def test_without_sync_bn_each_process_keeps_its_own_statistics(ranks: list[dict[str, Any]]) -> None:
    """The negative control: plain batch norm under DDP does not give the global batch's statistics."""
    x, y = _batch("2d")
    reference = _model("2d", 0.1)
    _train(reference, x, y, 1 / len(x))
    got = ranks[1]["BatchNorm2d-not-synchronized"]
    assert got["type"] == "BatchNorm2d"
    gap = float((got["running_mean"] - reference[1].running_mean).abs().max())
    assert gap > 1e-3, gap


def test_convert_and_revert_keep_the_state_and_the_class() -> None:
    model = _model("1d", 0.1)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x, _ = _batch("1d")
    before = model(x)
    sync = sync_batchnorm.convert(model)
    assert type(sync[1]) is sync_batchnorm.CpuSyncBatchNorm and sync[1].plain_type is nn.BatchNorm1d
    assert not sync[1].training and sync_batchnorm.is_synced(sync)
    torch.testing.assert_close(sync(x), before, rtol=0, atol=0)  # eval: the running statistics
    plain = sync_batchnorm.revert(sync)
    assert type(plain[1]) is nn.BatchNorm1d and not sync_batchnorm.is_synced(plain)
    torch.testing.assert_close(plain(x), before, rtol=0, atol=0)


def test_convert_for_cuda_uses_torchs_sync_batch_norm() -> None:
    sync = sync_batchnorm.convert(_model("2d", 0.1), "cuda")  # converting needs no GPU
    assert type(sync[1]) is nn.SyncBatchNorm
    assert type(sync_batchnorm.revert(sync)[1]) is nn.BatchNorm2d


def test_sync_bn_without_a_process_group_is_plain_batch_norm() -> None:
    x, _ = _batch("2d")
    plain = _model("2d", 0.1).train()
    sync = sync_batchnorm.convert(_model("2d", 0.1)).train()
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync[1].running_var, plain[1].running_var, rtol=0, atol=0)


def test_sum_and_agree_over_two_ranks(ranks: list[dict[str, Any]]) -> None:
    assert [r["sum"] for r in ranks] == [[1.0, 3.0, 11.0]] * WORLD
    assert [r["agreed"] for r in ranks] == ["BnfoldError: rank 1: destination not writable",
                                            "ReportedByRankZero: rank 1: destination not writable"]
    assert ranks[0]["described"] == "world size 2, backend gloo, device cpu"


def _timeout_worker(rank: int, out: Path) -> None:
    context = distributed.setup(torch.device("cpu"), timeout_s=3)
    try:
        if rank == 1:  # alive but never joins the collective
            deadline = time.monotonic() + 60
            while not (out / "0.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            torch.save({"error": None}, out / "1.pt")
            return
        try:
            context.sum([1.0])
            error = None
        except RuntimeError as exc:  # gloo raises a plain RuntimeError on a timeout
            error = " ".join(str(exc).split())
        torch.save({"error": error, "collective_failure": distributed.collective_failure(RuntimeError(error))},
                   out / "0.pt")
    finally:
        os._exit(0)  # leaving the group would wait for the rank that never answered


def test_a_rank_that_stops_answering_fails_the_collective_after_the_timeout(tmp_path: Path) -> None:
    ranks = _spawn(_timeout_worker, tmp_path)
    assert "Timed out" in ranks[0]["error"] and ranks[0]["collective_failure"]


def test_one_process_context_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    context = distributed.setup(torch.device("cpu"))
    assert not context.distributed and context.is_main and context.backend == ""
    assert context.sum([1, 2.5]) == [1.0, 2.5]
    with pytest.raises(BnfoldError, match=r"^nope$"):
        context.agree(BnfoldError("nope"))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"RANK": "0", "WORLD_SIZE": "2"}, "needs the environment variables LOCAL_RANK, MASTER_ADDR",
                     id="missing-variables"),
        pytest.param({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
                     "must be integers", id="not-integers"),
    ],
)
def test_setup_refuses_incomplete_launch_variables(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                   message: str) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BnfoldError, match=message):
        distributed.setup(torch.device("cpu"))


@pytest.mark.parametrize("order", [pytest.param((0, 1), id="rank0-first"), pytest.param((1, 0), id="rank1-first")])
def test_launch_names_the_killed_rank_not_the_one_the_agent_stopped(monkeypatch: pytest.MonkeyPatch,
                                                                    order: tuple[int, int]) -> None:
    """rank 1 killed by SIGKILL, rank 0 then stopped by the agent's SIGTERM: the report names rank 1."""
    import signal

    import torch.distributed.run as run_module
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    codes = {0: -signal.SIGTERM, 1: -signal.SIGKILL}
    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=codes[rank], error_file="")
                for rank in order}

    def fail(_: Any) -> None:
        raise ChildFailedError("bnfold", failures)

    monkeypatch.setattr(run_module, "run", fail)
    with pytest.raises(BnfoldError, match=r"^rank 1 of 2 \(pid 101\) was killed by SIGKILL; "):
        distributed.launch(2, ["train"])


def test_only_the_first_stop_signal_raises_and_the_handlers_come_back(capsys: pytest.CaptureFixture[str]) -> None:
    """A second Ctrl-C while the agent waits for the ranks must not raise again (it would stop them with
    SIGTERM mid-save); after the run the process's own handlers are back."""
    import signal

    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.api import SignalException

    original, before = api._terminate_process_handler, signal.getsignal(signal.SIGINT)
    with distributed._one_stop_signal():
        handler = api._terminate_process_handler
        assert handler is not original
        signal.signal(signal.SIGINT, handler)  # as the agent does when it starts the ranks
        with pytest.raises(SignalException):
            handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)  # acknowledged, not raised
        handler(signal.SIGTERM, None)  # neither: the first one is being handled
    assert api._terminate_process_handler is original and signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err == "bnfold: already stopping (SIGINT ignored): waiting for the ranks\n"


def _gone_worker(rank: int, out: Path) -> None:
    context = distributed.setup(torch.device("cpu"), timeout_s=20)
    try:
        context.sum([1.0])  # both joined
        if rank == 1:  # interrupted before it had a best epoch: it leaves without the final barrier
            torch.save({}, out / "1.pt")
            os._exit(0)
        time.sleep(1.0)  # rank 1 is gone
        outcome = {}
        for after_interrupt in (True, False):
            try:
                context.barrier(after_interrupt=after_interrupt)
                outcome[after_interrupt] = "passed"
            except RuntimeError as exc:
                outcome[after_interrupt] = f"raised: {distributed.collective_failure(exc)}"
        torch.save(outcome, out / "0.pt")
    finally:
        os._exit(0)


def test_a_rank_gone_after_ctrl_c_does_not_fail_the_final_barrier(tmp_path: Path) -> None:
    """Ctrl-C reaches the ranks one by one; one without a best epoch of its own leaves at once. Rank 0,
    with one to save, must not turn that into an internal error (seen in CI: 'Connection closed by peer')."""
    ranks = _spawn(_gone_worker, tmp_path)
    assert ranks[0] == {True: "passed", False: "raised: True"}
