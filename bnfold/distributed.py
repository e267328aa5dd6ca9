"""Data-parallel runs: the process group, who writes, metric reduction, and the launcher.

bnfold uses PyTorch's distributed engine as it is: ``torchrun`` (``torch.distributed.run``)
starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` joins the process group they describe (gloo on the CPU, nccl on
GPUs) with a bounded ``timeout``, so a rank that stops answering makes the others fail after that
many seconds instead of waiting forever. Without those variables a run is one process, world size 1,
and nothing here touches ``torch.distributed``.

Only rank 0 writes files and prints progress (:attr:`Context.is_main`). Metrics are reduced as
sums and counts (:func:`Context.sum`), never as averages of per-rank averages: a mean over ranks
of unequal shards would weigh their samples unequally. Checks that may fail on one rank only
(rank 0 checking its destinations) are agreed on with :func:`Context.agree`, so that every rank
raises the same error instead of the others waiting in the next collective.

:func:`launch` is the ``--nproc N`` convenience: it runs ``torch.distributed.run`` in this
process (standalone rendezvous on a free local port) for ``python -m bnfold ARGS`` and turns a
failed rank into one line naming the rank and how it ended.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bnfold.errors import BnfoldError

DEFAULT_TIMEOUT_S = 300.0  # a collective waiting longer than this fails (torch's default is 30 minutes)
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run; ``world_size == 1`` means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo" | "nccl" | "" (not distributed)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, prints progress and reports."""
        return self.rank == 0

    def describe(self) -> str:
        """``world size 2, backend gloo, device cpu`` (the line a run starts with)."""
        if not self.distributed:
            return f"world size 1 (one process), device {self.device}"
        return f"world size {self.world_size}, backend {self.backend}, device {self.device.type}"

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over all ranks (float64 ``all_reduce``; identity in one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return [float(v) for v in tensor.cpu()]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank had ``error``; every rank must call it at the same point.

        Rank 0 raises its own error, or ``rank R: message`` of the lowest failing rank; the other ranks
        raise :class:`ReportedByRankZero` (the CLI prints nothing for it). In one process: ``error``.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        code = getattr(error, "exit_code", 2)
        if self.is_main and error is not None:
            raise error
        rank, message = failed[0]
        raised = (BnfoldError if self.is_main else ReportedByRankZero)(f"rank {rank}: {message}")
        raised.exit_code = code
        raise raised

    def barrier(self, *, after_interrupt: bool = False) -> None:
        """Wait for every rank. ``after_interrupt``: this rank was interrupted (Ctrl-C), and a rank gone
        already is no failure: a rank interrupted outside the training loop's agreed stop (see
        :class:`StopRequest`) may leave at once while another has a best epoch to save."""
        if not self.distributed:
            return
        try:
            torch.distributed.barrier()
        except RuntimeError as exc:
            if not (after_interrupt and collective_failure(exc)):
                raise

    def _collective_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


_COLLECTIVE_MARKERS = ("gloo", "nccl", "Timed out", "Connection closed", "Connection reset", "DistBackendError")


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective: a lost or silent peer. gloo raises a plain ``RuntimeError``
    (``[.../gloo/...] Timed out waiting 3000ms for recv``), nccl a :class:`torch.distributed.DistError`."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COLLECTIVE_MARKERS)


class StopRequest:
    """Ctrl-C in a distributed run, as a request every rank acts on at the same step.

    Each rank gets the signal on its own, at its own moment: one raising ``KeyboardInterrupt`` at once
    could leave the training loop while another waits in a collective for it, and both hang until the
    collective's timeout (seen: a rank in an all-reduce, the other in the final barrier). Inside the
    ``with`` block SIGINT only notes the request; :meth:`agreed`, called by every rank at the same point
    of the loop, all-reduces it, so all ranks stop at the same step. In one process it changes nothing:
    Ctrl-C raises ``KeyboardInterrupt`` where it lands, as before.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if self.context.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
            self._installed = True
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        if not self._installed:
            return False
        return self.context.sum([1.0 if self.requested else 0.0])[0] > 0

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


class ReportedByRankZero(BnfoldError):
    """An error all ranks raise together (:meth:`Context.agree`) on a rank other than 0, which reports it."""


class CollectiveFailed(BnfoldError):
    """A collective with the other ranks failed: one of them died or stopped answering. Every rank reports it."""

    exit_code = 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: torch.device, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the process group torchrun describes, or return the one-process context.

    ``device`` is the resolved training device: ``cuda`` picks nccl and this rank's GPU
    ``cuda:LOCAL_RANK``; ``cpu`` picks gloo. ``timeout_s`` bounds every collective.
    """
    if not launched():
        return Context(device=device)
    missing = [v for v in _LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise BnfoldError(f"a distributed run needs the environment variables {', '.join(missing)}; start it "
                          "with torchrun (or bnfold train --nproc N)")
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise BnfoldError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                          f"{[os.environ[v] for v in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}") from None
    if not (timeout_s > 0 and timeout_s < 1e7):
        raise BnfoldError(f"the distributed timeout must be a positive number of seconds, got {timeout_s!r}")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise BnfoldError(f"rank {rank} has LOCAL_RANK {local} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); start at most that many per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_available():
        raise BnfoldError("this torch build has no torch.distributed; install one that has")
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.distributed.init_process_group(backend=backend, timeout=timeout, device_id=device)
    else:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return Context(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)


def teardown(context: Context) -> None:
    """Leave the process group (no-op for a one-process context)."""
    if context.backend and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                      if hasattr(signal, name))


@contextlib.contextmanager
def _one_stop_signal() -> Iterator[None]:
    """While torch's elastic agent runs here: only the first stop signal stops the ranks.

    The agent's handler raises ``SignalException`` for every signal, and one raised while it waits for
    the ranks to stop makes it stop them again with SIGTERM: a second Ctrl-C killed rank 0 mid-save
    (no checkpoint, a temporary file left). Later signals are acknowledged once and ignored; a rank
    that does not stop is still killed by the agent's own shutdown timeout. Afterwards the handlers
    are those from before (the agent leaves its own installed, and a signal then raised its exception
    out of unrelated code). Without the agent's handler (another torch) this changes nothing.
    """
    from torch.distributed.elastic.multiprocessing import api

    original = getattr(api, "_terminate_process_handler", None)
    before = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    seen: list[int] = []

    def first_only(signum: int, frame: Any) -> None:
        seen.append(signum)
        if len(seen) == 1:
            assert original is not None
            original(signum, frame)  # raises SignalException: the agent passes it on and waits
        elif len(seen) == 2:
            print(f"bnfold: already stopping ({signal.Signals(signum).name} ignored): waiting for the ranks",
                  file=sys.stderr)

    if original is not None:
        api._terminate_process_handler = first_only  # the agent installs it by this name when it starts
    try:
        yield
    finally:
        if original is not None:
            api._terminate_process_handler = original
        for sig, handler in before.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread; a handler set from C
                signal.signal(sig, handler)


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m bnfold ARGS`` in ``nproc`` processes on this machine via ``torch.distributed.run``.

    Returns 0 when all of them succeeded, or the exit code of the first rank that failed with one
    (a bnfold process that exits with a code has printed its error). Raises :class:`BnfoldError`
    naming the rank and the signal when a rank was killed (then the others, failing in their next
    collective, are not the cause). The elastic agent stops the other ranks
    as soon as one fails (``--max-restarts 0``). A signal to this process (Ctrl-C, a ``kill``) is passed
    on to every rank, which the agent waits for; then it returns 128 + the signal's number, as a shell
    reports a process killed by it (the ranks said what they saved: one interrupted by SIGINT keeps
    the best epoch so far). Signals while the ranks stop are acknowledged and otherwise ignored (see
    :func:`_one_stop_signal`), and this process's signal handlers are its own again on return.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise BnfoldError(f"--nproc must be a positive integer, got {nproc!r}")
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set, without its warning
    for name in list(logging.Logger.manager.loggerDict):  # we report failures ourselves, once
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # each has its own level (LOGLEVEL)
    parsed = get_args_parser().parse_args([
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "--monitor-interval", "0.5", "--module", "bnfold", *args,
    ])
    try:
        with _one_stop_signal():
            run(parsed)
    except ChildFailedError as exc:
        killed = sorted((rank, f) for rank, f in exc.failures.items() if f.exitcode < 0)
        if not killed:  # every failed rank exited with a code, after printing its error
            return exc.get_first_failure()[1].exitcode
        # The cause: the agent stops the other ranks with SIGTERM once one failed, so a rank killed by
        # another signal comes first; the ranks' order says nothing (rank 0 may be the one stopped).
        rank, failure = min(killed, key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]))
        error = BnfoldError(f"rank {rank} of {nproc} (pid {failure.pid}) was killed by {failure.signal_name()}; "
                            "the other ranks were stopped and nothing was saved")
        error.exit_code = 1
        raise error from None
    except SignalException as exc:  # the agent passed the signal on to the ranks and waited for them
        number = int(exc.sigval)
        if number != signal.SIGINT:  # SIGINT: each rank said what it saved; any other signal stops them unsaid
            print(f"bnfold: stopped by {signal.Signals(number).name}, passed on to the ranks still running",
                  file=sys.stderr)
        return 128 + number
    finally:
        sys.stdout.flush()
    return 0
