"""The model repository: ``DIR/<name>/<version>/model.onnx``, loaded at start-up, changed at run time.

Versions are integer directory names; a request naming none gets the newest *ready* version, and
every loaded version is addressable. An optional ``DIR/<name>/config.json`` overrides batching and
threading for all versions of that model, may pin their files' digests, and may choose which
versions serve (``version_policy``, :mod:`service.policy`) (keys: :class:`ModelConfig`).

Changes at run time (:mod:`service.control` decides when): :meth:`ModelRepository.plan` builds
what a model should serve off the event loop (new sessions, self-tests, batchers), reusing the
versions whose files did not change; :meth:`~ModelRepository.commit` swaps it in on the event loop
in one assignment, so every request sees either the old set or the new one; and
:meth:`~ModelRepository.retire` drains what left: a request holds its version through
:meth:`ModelVersion.lease`, and a version's batcher and onnxruntime session are freed only once
no lease is left (or ``request_timeout_s`` later, when every request has missed its deadline).
A changed version whose new files fail keeps serving its old files, with the failure noted.

Isolation: a version that fails in any way while it loads (unreadable file, digest not the pinned
one, malformed certificate, failed self-test, bad ``config.json``, any exception at all) stays
listed with ``ready=False`` and a reason; the others still serve. So does a version whose batching
worker stops later. Reasons reach HTTP clients, so they name files relative to the repository
(``<name>/<version>/model.onnx``), never the server's paths; the logs carry the full path.

Batching: a version batches only when its rows are independent (:mod:`service.independence`), or
when its ``config.json`` says ``"dynamic_batching": true``; ``false`` always turns it off.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bnfold.certificate import Certificate, read
from bnfold.tolerance import Comparison, Tolerance
from service import independence, selftest
from service.batching import Batcher
from service.config import MAX_BATCH_SIZE, Settings, out_of_bounds
from service.cpu import threads_per_session, usable_cpus
from service.errors import ModelNotFound, ModelNotReady
from service.independence import Decision
from service.logs import event
from service.metrics import ServiceMetrics
from service.policy import ALL, VersionPolicy
from service.polling import CONFIG_FILE, MODEL_FILE, Signature, scan_model
from service.runtime import ModelRuntime

DRAIN_MARGIN_S = 5.0  # after request_timeout_s every request of a retired version has ended; this is slack
MAX_CONFIG_BYTES = 64 * 1024  # a config.json is a few keys; a larger one is a mistake or an attack
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _brief(text: object, limit: int = 500) -> str:
    """One line of at most ``limit`` characters (exception messages may span lines or pages)."""
    return " ".join(str(text).split())[:limit]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings: a certificate's ``errors`` may hold inf (JSON responses may not)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Per-model overrides; ``None`` = the service-wide setting (or, for ``dynamic_batching``, the probe)."""

    max_batch_size: int | None = None  # most rows per coalesced run, 1 to 4096
    max_queue_delay_ms: float | None = None  # extra wait to fill a batch, 0 to 10000
    intra_op_threads: int | None = None  # onnxruntime threads per version; more than the usable CPUs are clamped
    dynamic_batching: bool | None = None  # None = batch if the probe shows rows independent; true/false = operator
    sha256: str | dict[str, str] | None = None  # pinned digest of model.onnx: one for every version, or per version
    version_policy: VersionPolicy = ALL  # which versions serve: all (default), latest N ready, or specific ones

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read ``config.json``. Raises ``ValueError`` naming an unknown key or a bad value (never the path)."""
        if not path.exists():
            return cls()
        try:
            with path.open("rb") as file:
                data = file.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ValueError(f"it is larger than {MAX_CONFIG_BYTES} bytes")
            body = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
            raise ValueError(f"{CONFIG_FILE} is not readable JSON: {_brief(exc, 200)}") from exc
        if not isinstance(body, dict):
            raise ValueError(f"{CONFIG_FILE} must hold a JSON object, got {type(body).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"{CONFIG_FILE} has unknown keys {[_brief(k, 40) for k in unknown][:10]}; "
                             f"known keys are {sorted(known)}")
        for key in ("max_batch_size", "intra_op_threads"):
            value = body.get(key)
            if value is not None and (type(value) is not int or value < 1 or
                                      (key == "max_batch_size" and value > MAX_BATCH_SIZE)):
                bound = f"1 to {MAX_BATCH_SIZE}" if key == "max_batch_size" else "1 or more"
                raise ValueError(f"{CONFIG_FILE}: {key} must be a positive integer, got {_brief(repr(value), 40)}; "
                                 f"allowed: {bound}")
        delay = body.get("max_queue_delay_ms")
        if delay is not None and out_of_bounds("max_queue_delay_ms", delay) is not None:
            raise ValueError(f"{CONFIG_FILE}: max_queue_delay_ms must be a non-negative number, got "
                             f"{_brief(repr(delay), 40)}; allowed: a finite number of ms from 0 to 10000")
        batching = body.get("dynamic_batching")
        if batching is not None and type(batching) is not bool:
            raise ValueError(f"{CONFIG_FILE}: dynamic_batching must be true or false, got {_brief(repr(batching), 40)}")
        pin = body.get("sha256")
        pins = pin if isinstance(pin, dict) else {"every version": pin} if pin is not None else {}
        for version, digest in pins.items():
            if version != "every version" and not (version.isascii() and version.isdigit()):
                raise ValueError(f"{CONFIG_FILE}: sha256 maps version numbers to digests, got key "
                                 f"{_brief(repr(version), 40)}")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
                raise ValueError(f"{CONFIG_FILE}: sha256 for {version} must be 64 hexadecimal digits, got "
                                 f"{_brief(repr(digest), 80)}")
        if "version_policy" in body:
            try:
                body["version_policy"] = VersionPolicy.parse(body["version_policy"])
            except ValueError as exc:
                raise ValueError(f"{CONFIG_FILE}: {exc}") from None
        return cls(**body)

    def pin(self, version: int) -> str | None:
        """The digest ``version``'s model.onnx must have (lower case), or ``None`` when it is not pinned.

        Raises ``ValueError`` when ``sha256`` pins some versions but not this one: it was not approved.
        """
        if self.sha256 is None:
            return None
        if isinstance(self.sha256, str):
            return self.sha256.lower()
        digest = {int(k): v for k, v in self.sha256.items()}.get(version)
        if digest is None:
            raise ValueError(f"{CONFIG_FILE} pins sha256 for versions {sorted(int(k) for k in self.sha256)} "
                             f"only, not version {version}")
        return digest.lower()


@dataclass(eq=False)  # identity: two entries of one version (old and new files) are different entries
class ModelVersion:
    """One version's state; ``runtime`` and ``batcher`` are set only when it is ready."""

    name: str
    version: int
    path: Path
    ready: bool = False
    reason: str | None = None
    runtime: ModelRuntime | None = None
    batcher: Batcher | None = None
    certificate: Certificate | None = None
    selftest: Comparison | None = None
    batching: Decision | None = None  # whether requests share runs, and why
    signature: Signature | None = None  # the files this entry was loaded from (None: not known)
    stale: str | None = None  # the files changed, the new ones did not load, and this entry serves on: why
    rejected: Signature | None = None  # the signature of those new files, so they are not retried every poll
    inflight: int = 0  # requests holding a lease (event-loop thread only)
    retiring: bool = False  # no longer in the repository; freed once the leases are returned

    @property
    def file(self) -> str:
        """The model file as clients may see it: relative to the repository."""
        return f"{self.name}/{self.version}/{MODEL_FILE}"

    def serving(self) -> tuple[ModelRuntime, Batcher]:
        """The runtime and batcher of a ready version. Raises :class:`ModelNotReady` with the reason."""
        if not self.ready or self.runtime is None or self.batcher is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready: {self.reason}")
        return self.runtime, self.batcher

    def acquire(self) -> tuple[ModelRuntime, Batcher]:
        """:meth:`serving`, and a lease on it: a retired version is not freed while a lease is out.

        Take it on the event loop, right after :meth:`ModelRepository.get` (no ``await`` between),
        and :meth:`release` it exactly once, when the outputs are encoded (or the request failed).
        """
        served = self.serving()
        self.inflight += 1
        return served

    def release(self) -> None:
        """Return a lease taken by :meth:`acquire`."""
        self.inflight -= 1

    @contextmanager
    def lease(self) -> Iterator[tuple[ModelRuntime, Batcher]]:
        """:meth:`acquire` and :meth:`release` around the ``with`` block."""
        runtime, batcher = self.acquire()
        try:
            yield runtime, batcher
        finally:
            self.release()

    def certificate_summary(self) -> dict[str, Any] | None:
        cert = self.certificate
        if cert is None:
            return None
        summary: dict[str, Any] = {
            "architecture": cert.architecture, "bnfold_version": cert.bnfold_version,
            "source_sha256": cert.source_sha256, "class_labels": cert.class_labels,
            "folded": cert.folded, "kept": cert.kept, "errors": _json_safe(cert.errors),
            "tolerance": cert.tolerance.to_dict(),
        }
        if self.selftest is not None:
            summary["selftest"] = {"passed": self.selftest.passed, "max_abs": self.selftest.max_abs,
                                   "allowed": self.selftest.allowed}
        return summary

    def batching_summary(self) -> dict[str, Any] | None:
        """Whether this version coalesces requests, why, and its limits (``None`` before it loaded)."""
        if self.batching is None or self.batcher is None:
            return None
        return {"enabled": self.batcher.batches, "reason": self.batching.reason,
                "max_batch_size": self.batcher.max_batch_size,
                "max_queue_delay_ms": self.batcher.max_queue_delay_s * 1000.0}


@dataclass
class Plan:
    """What one model should serve after a change, and the entries that leave (to :meth:`ModelRepository.retire`)."""

    name: str
    versions: dict[int, ModelVersion]
    retire: list[ModelVersion]
    built: list[ModelVersion]  # entries loaded for this plan (ready or not)

    @property
    def changed(self) -> bool:
        return bool(self.retire or self.built)


class ModelRepository:
    """All model versions under ``settings.model_repository``; :meth:`load` once, :meth:`close` at shutdown.

    ``models`` maps each loaded model to its versions (ready or not, oldest first). Only the event loop
    changes it (:meth:`commit`, :meth:`remove`), each time by one assignment, so a request reading it
    sees a consistent set.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.retiring: list[ModelVersion] = []  # left the repository, draining their requests
        self.loaded = False
        self._default_threads = 1

    @property
    def ready(self) -> bool:
        """Loading finished and at least one model version serves."""
        return self.loaded and any(v.ready for versions in self.models.values() for v in versions.values())

    def load(self) -> None:
        """Find and load every model directory (blocking, at start-up); a version that fails is not ready
        with a reason, never an exception here."""
        root = self.settings.model_repository
        try:
            model_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:
            event(logging.ERROR, "model repository not found", path=str(root), error=_brief(exc))
            self.loaded = True
            return
        found: dict[str, dict[int, Signature]] = {}
        for model_dir in model_dirs:
            try:
                found[model_dir.name] = self._present(model_dir)
            except OSError as exc:
                event(logging.ERROR, "model directory not readable", path=str(model_dir), error=_brief(exc))
        sessions = sum(len(v) for v in found.values())
        self._default_threads = self.settings.intra_op_threads or threads_per_session(self.settings.workers,
                                                                                      max(sessions, 1))
        for name, versions in found.items():
            if versions:
                plan = self.plan(name, versions)
                if plan.versions:
                    self.models[name] = plan.versions
        self.loaded = True

    @staticmethod
    def _present(model_dir: Path) -> dict[int, Signature]:
        """:func:`~service.polling.scan_model`, warning about version directories that are not integers."""
        for path in model_dir.iterdir():
            if path.is_dir() and not (path.name.isascii() and path.name.isdigit()) and not path.name.startswith("."):
                event(logging.WARNING, "ignored non-integer version directory", path=str(path))
        return scan_model(model_dir)

    def scan(self, name: str) -> dict[int, Signature]:
        """The versions of model ``name`` on disk now. Raises :class:`ModelNotFound` when it has no directory."""
        root = self.settings.model_repository
        try:
            listed = name in {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
            if listed:
                return self._present(root / name)
        except OSError as exc:
            event(logging.ERROR, "model directory not readable", path=str(root / name), error=_brief(exc))
        raise ModelNotFound(f"model {name!r:.100} is not in the model repository (expected a directory "
                            f"<repository>/{name:.100}/<version>/{MODEL_FILE})")

    def _config(self, name: str) -> ModelConfig | str:
        """``name``'s config.json, or why it is not usable (a reason for every version)."""
        try:
            return ModelConfig.load(self.settings.model_repository / name / CONFIG_FILE)
        except ValueError as exc:
            return str(exc)
        except Exception as exc:  # a bug in the checks must not take the other models down
            return f"{CONFIG_FILE} could not be read: {type(exc).__name__}: {_brief(exc)}"

    def threads(self, name: str, config: ModelConfig) -> int:
        """Intra-op threads of a new session of ``name``."""
        default = self._default_threads
        if self.loaded and not self.settings.intra_op_threads:  # at run time: share by the sessions then loaded
            sessions = 1 + sum(len(v) for v in self.models.values())
            default = threads_per_session(self.settings.workers, sessions)
        return self._threads(name, config, default)

    def plan(self, name: str, present: dict[int, Signature], retry: bool = False) -> Plan:
        """What ``name`` should serve given the versions ``present`` on disk (blocking: call it off the event loop).

        Walks the version policy's candidates newest first: a version whose signature is that of its
        current entry keeps it (unless ``retry`` and it is not ready); any other is loaded anew. A changed
        version whose new files do not serve while its current entry does keeps the current entry (noted
        in :attr:`ModelVersion.stale`).
        ``latest N`` stops after N ready versions. Never raises; failures are versions' reasons.
        """
        current = self.models.get(name, {})
        config = self._config(name)
        policy = config.version_policy if isinstance(config, ModelConfig) else ALL
        versions: dict[int, ModelVersion] = {}
        built: list[ModelVersion] = []
        retire: list[ModelVersion] = []
        ready, wanted = 0, policy.wanted()
        for number in policy.candidates(present):
            if wanted is not None and ready >= wanted:
                break
            signature = present[number]
            old = current.get(number)
            if old is not None and (old.signature == signature or old.rejected == signature) and \
                    not (retry and not old.ready):
                entry = old
            else:
                entry = self._build(name, number, config, signature)
                built.append(entry)
                if old is not None and old.ready and not entry.ready:
                    old.stale = (f"{old.file} or {CONFIG_FILE} changed, and the new files do not serve "
                                 f"({entry.reason}); the previous files keep serving")
                    old.rejected = signature
                    event(logging.ERROR, "changed model version not served", model=name, version=number,
                          reason=entry.reason)
                    entry = old
                elif old is not None:
                    retire.append(old)
            versions[number] = entry
            ready += entry.ready
        retire += [old for number, old in current.items() if versions.get(number) is not old and old not in retire]
        return Plan(name, dict(sorted(versions.items())), retire, built)

    def _build(self, name: str, number: int, config: ModelConfig | str, signature: Signature) -> ModelVersion:
        """A new entry for ``name/number``, loaded (ready) or with the reason it is not (blocking)."""
        entry = ModelVersion(name, number, self.settings.model_repository / name / str(number) / MODEL_FILE,
                             signature=signature)
        if isinstance(config, str):
            entry.reason = config
        else:
            try:
                self._load_version(entry, config, self.threads(name, config))
            except Exception as exc:  # whatever one version raises, the others still load
                self._unload(entry)
                entry.reason = f"failed to load: {type(exc).__name__}: {self._public(exc)}"
                event(logging.ERROR, "model load raised", model=name, version=entry.version,
                      path=str(entry.path), error=f"{type(exc).__name__}: {_brief(exc)}")
        self.metrics.model_ready.labels(name, str(entry.version)).set(1 if entry.ready else 0)
        fields_ = {"model": name, "version": entry.version, "ready": entry.ready, "path": str(entry.path)}
        if entry.ready:
            event(logging.INFO, "model ready", **fields_, threads=entry.runtime.threads if entry.runtime else 0,
                  batching=bool(entry.batcher and entry.batcher.batches),
                  batching_reason=entry.batching.reason if entry.batching else None,
                  certified=entry.certificate is not None)
        else:
            event(logging.ERROR, "model not ready", **fields_, reason=entry.reason)
        return entry

    def commit(self, plan: Plan) -> None:
        """Serve ``plan`` (event loop only): one assignment, so each request sees the old versions or the new."""
        for entry in plan.retire:
            entry.retiring = True
        self.retiring += plan.retire
        if plan.versions:
            self.models[plan.name] = plan.versions
        else:
            self.models.pop(plan.name, None)

    def remove(self, name: str) -> list[ModelVersion]:
        """Stop serving model ``name`` (event loop only); returns its entries, to :meth:`retire`."""
        entries = list(self.models.pop(name, {}).values())
        for entry in entries:
            entry.retiring = True
        self.retiring += entries
        return entries

    async def retire(self, entries: list[ModelVersion]) -> None:
        """Free ``entries`` once their leases are returned, at most ``request_timeout_s`` + a margin from now.

        The batcher answers what is queued before it stops, then the session goes with the last reference.
        """
        deadline = time.monotonic() + self.settings.request_timeout_s + DRAIN_MARGIN_S
        for entry in entries:
            while entry.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if entry.inflight:
                event(logging.WARNING, "model version freed with requests still holding it", model=entry.name,
                      version=entry.version, requests=entry.inflight)
            await asyncio.to_thread(self._unload, entry)
            if entry in self.retiring:
                self.retiring.remove(entry)
            served = self.models.get(entry.name, {}).get(entry.version)
            if served is None:
                self.metrics.model_ready.labels(entry.name, str(entry.version)).set(0)
            event(logging.INFO, "model version unloaded", model=entry.name, version=entry.version,
                  replaced=served is not None)

    @staticmethod
    def _threads(name: str, config: ModelConfig, default: int) -> int:
        """``config.json``'s intra_op_threads clamped to the usable CPUs (more threads only crash or contend)."""
        if config.intra_op_threads is None:
            return default
        cpus = usable_cpus()
        if config.intra_op_threads > cpus:
            event(logging.WARNING, "intra_op_threads clamped to the usable CPUs", model=name,
                  requested=config.intra_op_threads, usable_cpus=cpus)
            return cpus
        return config.intra_op_threads

    def _public(self, text: object) -> str:
        """``text`` (an exception, say) without the server's paths, as one bounded line."""
        message = str(text)
        for path, shown in ((self.settings.model_repository.resolve(), ""), (self.settings.model_repository, "")):
            message = message.replace(str(path) + "/", shown)
        return _brief(message)

    def _load_version(self, entry: ModelVersion, config: ModelConfig, threads: int) -> None:
        if not entry.path.is_file():
            entry.reason = f"missing {entry.file}"
            return
        try:
            expected = config.pin(entry.version)
        except ValueError as exc:
            entry.reason = str(exc)
            return
        data = None
        if expected is not None:  # the session loads these very bytes: the file checked is the file served
            data = entry.path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                entry.reason = f"{entry.file} has sha256 {actual}, but {CONFIG_FILE} pins sha256 {expected}"
                return
        try:
            runtime = ModelRuntime(entry.path, threads, spinning=self.settings.ort_spinning, model=data,
                                   providers=self.settings.provider_list)
        except Exception as exc:  # onnxruntime raises several types for unreadable/invalid models
            entry.reason = f"failed to load: {type(exc).__name__}: {self._public(exc)}"
            return
        try:
            entry.certificate = read(runtime.metadata)
        except Exception as exc:  # ValueError for a malformed one; anything else must not escape either
            entry.reason = f"malformed bnfold certificate: {_brief(exc)}"
            return
        if entry.certificate is None and self.settings.require_certificate:
            entry.reason = "the model has no bnfold certificate, and BNFOLD_REQUIRE_CERTIFICATE=true refuses it"
            return
        if entry.certificate is not None:
            entry.selftest, entry.reason = selftest.check(runtime, entry.certificate)
            if entry.reason is not None:
                return
        entry.batching = self._batching(entry, runtime, config)
        settings = self.settings
        delay_ms = config.max_queue_delay_ms if config.max_queue_delay_ms is not None else settings.max_queue_delay_ms
        entry.runtime = runtime
        entry.batcher = Batcher(
            f"{entry.name}/{entry.version}", runtime.run,
            batches=entry.batching.enabled,
            max_batch_size=config.max_batch_size or settings.max_batch_size,
            max_queue_delay_s=delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_queue_bytes=settings.max_queue_bytes,
            observer=self.metrics.observer(entry.name),
            on_failure=self._on_worker_failure(entry),
        )
        entry.ready = True

    @staticmethod
    def _batching(entry: ModelVersion, runtime: ModelRuntime, config: ModelConfig) -> Decision:
        """Batch when rows are shown independent or the operator opts in; an opt-out always wins."""
        if config.dynamic_batching is False:
            return Decision(False, f"{CONFIG_FILE} sets dynamic_batching: false")
        if not runtime.batches:
            return Decision(False, "not every input and output has a dynamic first dimension")
        cert = entry.certificate
        tolerance = cert.tolerance if cert is not None else Tolerance()
        if not (math.isfinite(tolerance.atol) and math.isfinite(tolerance.rtol)):
            tolerance = Tolerance()
        probed = independence.probe(runtime.run, runtime.inputs, runtime.output_names, cert, tolerance)
        if config.dynamic_batching is None:
            return probed
        if not probed.enabled:
            event(logging.WARNING, "dynamic_batching: true although the probe found rows interacting",
                  model=entry.name, version=entry.version, probe=probed.reason)
        return Decision(True, f"{CONFIG_FILE} sets dynamic_batching: true (the operator vouches that rows are "
                              f"independent; probe: {probed.reason})")

    def _on_worker_failure(self, entry: ModelVersion) -> Callable[[str], None]:
        def fail(reason: str) -> None:
            entry.ready = False
            entry.reason = reason
            self.metrics.model_ready.labels(entry.name, str(entry.version)).set(0)
            event(logging.ERROR, "model not ready", model=entry.name, version=entry.version, reason=reason)
        return fail

    @staticmethod
    def _unload(entry: ModelVersion) -> None:
        if entry.batcher is not None:
            entry.batcher.close()
        entry.ready, entry.runtime, entry.batcher = False, None, None

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The named version (the newest if ``None``). Raises :class:`ModelNotFound`."""
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model {name!r:.100}; this server has {sorted(self.models)}")
        if version is None:  # the newest that serves; else the newest, whose reason the caller reports
            if len(versions) == 1:  # the common case, on every request: the one version, ready or not
                for entry in versions.values():
                    return entry
            ready = [number for number, entry in versions.items() if entry.ready]
            return versions[max(ready or versions)]
        number = int(version) if version.isascii() and version.isdigit() else None
        if number is None or number not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r:.40}; it has {list(versions)}")
        return versions[number]

    def close(self) -> None:
        for entry in [*(e for versions in self.models.values() for e in versions.values()), *self.retiring]:
            if entry.batcher is not None:
                entry.batcher.close()
