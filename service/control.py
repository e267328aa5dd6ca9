"""Model control: the repository index, explicit load and unload, and poll mode (``BNFOLD_MODEL_CONTROL``).

The interface (shared by the HTTP routes and the gRPC servicer; reach it as ``Service.control``)::

    Mode = Literal["none", "explicit", "poll"]
    IndexEntry(name: str, version: str, state: str, reason: str)   # state: READY | UNAVAILABLE | LOADING | UNLOADING
    ModelControl.mode: Mode
    ModelControl.index(ready_only: bool = False) -> list[IndexEntry]
    async ModelControl.load(name: str) -> None     # ControlDisabled | ModelNotFound | LoadFailed
    async ModelControl.unload(name: str) -> None   # ControlDisabled | ModelNotFound; drains in-flight first

Modes, as Triton names them:

``none`` (default)
    the repository as found at start-up; load and unload raise :class:`ControlDisabled`.
``explicit``
    load and unload calls; at start-up every model is loaded (bnfold has no ``--load-model``).
    ``load`` (re)reads the model's directory and ``config.json`` now: changed versions are reloaded,
    new ones loaded, removed ones unloaded. One worker only (``Settings`` refuses more): a call
    reaches one worker process, and the others would go on serving something else.
``poll``
    every ``repository_poll_s`` seconds the repository is scanned, and a model version that is new,
    changed or removed is loaded, reloaded or unloaded once its files stopped changing
    (:mod:`service.polling`); load and unload raise :class:`ControlDisabled` (the repository is the
    one source of truth). With several workers, each worker polls by itself: for a poll interval
    or so, workers may serve different versions.

The index lists every model directory: the loaded versions (READY, or UNAVAILABLE with their
reason), versions draining after an unload (UNLOADING), and, by name only, models that are not
loaded (UNAVAILABLE: "unloaded" or "not loaded", LOADING while they load). It answers in every mode.

Every change goes through :meth:`ModelRepository.plan` (off the event loop), ``commit`` (one swap on
the event loop) and ``retire`` (free what left once its in-flight requests are done). One lock
orders polls, loads and unloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

from service.errors import ControlDisabled, LoadFailed, ModelNotFound
from service.logs import event
from service.polling import Settled, Signature, model_names, scan
from service.repository import ModelRepository, ModelVersion, Plan

Mode = Literal["none", "explicit", "poll"]
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (Triton's ``name``, ``version``, ``state``, ``reason``; "" when none)."""

    name: str
    version: str
    state: str
    reason: str


class ModelControl:
    """Index, load, unload and polling over one :class:`ModelRepository` (event loop only)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.mode: Mode = repository.settings.model_control
        self.unloaded: set[str] = set()  # unloaded by a call, for the index's reason
        self._lock = asyncio.Lock()
        self._loading: str | None = None  # the model being planned now
        self._settled = Settled()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """In poll mode, start polling (after :meth:`ModelRepository.load`, on the running event loop)."""
        if self.mode == "poll" and self._task is None:
            with contextlib.suppress(OSError):
                self._settled.update(self._scan()[0])  # what start-up loaded is the first scan
            self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="bnfold-poll")

    async def stop(self) -> None:
        """Stop polling; waits for a poll in progress to be cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the interface -----------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model directory and loaded version, by name then version (only READY ones if ``ready_only``)."""
        repository = self.repository
        entries: list[IndexEntry] = []
        for version in repository.retiring:
            entries.append(IndexEntry(version.name, str(version.version), UNLOADING, "unloading"))
        for name, versions in repository.models.items():
            for version in versions.values():
                if version.ready:
                    entries.append(IndexEntry(name, str(version.version), READY, version.stale or ""))
                else:
                    entries.append(IndexEntry(name, str(version.version), UNAVAILABLE, version.reason or ""))
        try:
            on_disk = model_names(repository.settings.model_repository)
        except OSError:
            on_disk = []
        draining = {version.name for version in repository.retiring}
        for name in on_disk:
            if name not in repository.models and name not in draining:
                state = LOADING if name == self._loading else UNAVAILABLE
                reason = "loading" if state == LOADING else "unloaded" if name in self.unloaded else "not loaded"
                entries.append(IndexEntry(name, "", state, reason))
        entries.sort(key=lambda e: (e.name, int(e.version) if e.version else -1, e.state))
        return [e for e in entries if e.state == READY] if ready_only else entries

    async def load(self, name: str) -> None:
        """Load or reload model ``name`` from the repository now (explicit mode).

        Raises :class:`ControlDisabled` in other modes, :class:`ModelNotFound` without a model directory
        of that name, :class:`LoadFailed` naming each version that does not serve and why (the versions
        that do serve are served).
        """
        self._allowed("load")
        async with self._lock:
            present = await asyncio.to_thread(self.repository.scan, name)
            plan = await self._apply(name, present, retry=True)
            self.unloaded.discard(name)
        failed = {number: entry.reason or "" for number, entry in plan.versions.items() if not entry.ready}
        failed |= {number: entry.stale for number, entry in plan.versions.items() if entry.stale}
        if not plan.versions:
            raise LoadFailed(f"model {name!r:.100} has no version its version policy allows (expected "
                             f"<repository>/{name:.100}/<integer version>/model.onnx)")
        if failed:
            serving = [n for n, e in plan.versions.items() if e.ready]
            raise LoadFailed(f"model {name!r:.100}: " + "; ".join(f"version {n} did not load: {r}"
                                                                   for n, r in sorted(failed.items()))
                             + f"; serving versions {serving}")

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``; returns once their in-flight requests have finished.

        Raises :class:`ControlDisabled` outside explicit mode, :class:`ModelNotFound` for a model that
        is neither loaded nor in the repository.
        """
        self._allowed("unload")
        async with self._lock:
            if name not in self.repository.models:
                try:
                    names = model_names(self.repository.settings.model_repository)
                except OSError:
                    names = []
                if name not in names:
                    raise ModelNotFound(f"unknown model {name!r:.100}")
            entries = self.repository.remove(name)
            self.unloaded.add(name)
            event(logging.INFO, "model unloading", model=name, versions=[e.version for e in entries],
                  inflight=sum(e.inflight for e in entries))
            await self.repository.retire(entries)

    # -- polling -----------------------------------------------------------------------------------

    async def poll(self) -> None:
        """One scan: load, reload or unload what changed and stopped changing since the previous scan.

        A repository or model directory that cannot be read (an unmounted volume, a permission error) changes
        nothing there: what is loaded keeps serving.
        """
        async with self._lock:
            try:
                found, unreadable = await asyncio.to_thread(self._scan)
            except OSError:
                return
            settled = self._settled.update(found)
            for name in sorted((set(found) | set(self.repository.models)) - unreadable):
                current = self.repository.models.get(name, {})
                present: dict[int, Signature] = {}
                for number, signature in found.get(name, {}).items():
                    loaded = current[number].signature if number in current else None
                    if number in settled.get(name, {}):
                        present[number] = signature
                    elif loaded is not None:
                        present[number] = loaded  # changing on disk: the loaded files serve meanwhile
                if name in found and self._unchanged(present, current):
                    continue
                await self._apply(name, present)

    @staticmethod
    def _unchanged(present: dict[int, Signature], current: dict[int, ModelVersion]) -> bool:
        """Nothing to do: the versions to consider are the loaded ones, with the files they were loaded from
        (or files already rejected). Cheap, so an idle poll loads nothing and reads no config.json."""
        return set(present) == set(current) and \
            all(present[n] in (v.signature, v.rejected) for n, v in current.items())

    async def _poll_forever(self) -> None:
        interval = self.repository.settings.repository_poll_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception as exc:  # a bug in one poll must not stop the next ones
                event(logging.ERROR, "repository poll failed", error=f"{type(exc).__name__}: {exc}")

    # -- helpers -----------------------------------------------------------------------------------

    def _allowed(self, what: str) -> None:
        if self.mode == "explicit":
            return
        why = ("the repository as found at start-up is served" if self.mode == "none" else
               "the server follows the repository: write or remove version directories instead")
        raise ControlDisabled(f"model {what} needs BNFOLD_MODEL_CONTROL=explicit, got "
                              f"BNFOLD_MODEL_CONTROL={self.mode} ({why})")

    def _scan(self) -> tuple[dict[str, dict[int, Signature]], set[str]]:
        """The repository on disk; a model directory that cannot be read is left as it is served."""
        try:
            found, unreadable = scan(self.repository.settings.model_repository)
        except OSError as exc:
            event(logging.ERROR, "model repository not readable", error=str(exc))
            raise
        for name in sorted(unreadable):
            event(logging.ERROR, "model directory not readable; it serves on as loaded", model=name)
        return found, unreadable

    async def _apply(self, name: str, present: dict[int, Signature], retry: bool = False) -> Plan:
        """Plan ``name`` off the event loop, swap it in, and free what left (under the lock)."""
        self._loading = name
        try:
            plan = await asyncio.to_thread(self.repository.plan, name, present, retry)
        finally:
            self._loading = None
        if plan.changed:
            self.repository.commit(plan)
            if plan.changed:
                event(logging.INFO, "model versions changed", model=name,
                      serving=[n for n, e in plan.versions.items() if e.ready],
                      not_ready=[n for n, e in plan.versions.items() if not e.ready],
                      unloading=[e.version for e in plan.retire])
        await self.repository.retire(plan.retire)
        return plan
