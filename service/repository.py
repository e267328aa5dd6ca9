"""The model repository: ``DIR/<name>/<version>/model.onnx`` loaded at start-up.

Versions are integer directory names; the newest is served when a request names none, and every
version is addressable. An optional ``DIR/<name>/config.json`` overrides batching and threading
for all versions of that model (keys: :class:`ModelConfig`). A version that fails to load or fails
its certificate self-test stays listed with ``ready=False`` and a reason; the others still serve.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bnfold.certificate import Certificate, read
from bnfold.tolerance import Comparison
from service import selftest
from service.batching import Batcher
from service.config import Settings
from service.cpu import threads_per_session
from service.errors import ModelNotFound, ModelNotReady
from service.logs import event
from service.metrics import ServiceMetrics
from service.runtime import ModelRuntime

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """Per-model overrides; ``None`` = the service-wide setting."""

    max_batch_size: int | None = None  # most rows per coalesced run
    max_queue_delay_ms: float | None = None  # extra wait to fill a batch
    intra_op_threads: int | None = None  # onnxruntime threads for each version of this model
    dynamic_batching: bool = True  # off = one request per run even if the model could batch

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """Read ``config.json``. Raises ``ValueError`` naming an unknown key or a bad value."""
        if not path.exists():
            return cls()
        try:
            body = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not readable JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(body).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; known keys are {sorted(known)}")
        for key in ("max_batch_size", "intra_op_threads"):
            value = body.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
        delay = body.get("max_queue_delay_ms")
        if delay is not None and (type(delay) not in (int, float) or delay < 0):
            raise ValueError(f"{path}: max_queue_delay_ms must be a non-negative number, got {delay!r}")
        if type(body.get("dynamic_batching", True)) is not bool:
            raise ValueError(f"{path}: dynamic_batching must be true or false, got {body['dynamic_batching']!r}")
        return cls(**body)


@dataclass
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

    def serving(self) -> tuple[ModelRuntime, Batcher]:
        """The runtime and batcher of a ready version. Raises :class:`ModelNotReady` with the reason."""
        if self.runtime is None or self.batcher is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready: {self.reason}")
        return self.runtime, self.batcher

    def certificate_summary(self) -> dict[str, Any] | None:
        cert = self.certificate
        if cert is None:
            return None
        summary: dict[str, Any] = {
            "architecture": cert.architecture, "bnfold_version": cert.bnfold_version,
            "source_sha256": cert.source_sha256, "class_labels": cert.class_labels,
            "folded": cert.folded, "kept": cert.kept, "errors": cert.errors, "tolerance": cert.tolerance.to_dict(),
        }
        if self.selftest is not None:
            summary["selftest"] = {"passed": self.selftest.passed, "max_abs": self.selftest.max_abs,
                                   "allowed": self.selftest.allowed}
        return summary


class ModelRepository:
    """All model versions under ``settings.model_repository``; :meth:`load` once, :meth:`close` at shutdown."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self.loaded = False

    @property
    def ready(self) -> bool:
        """Loading finished and at least one model version serves."""
        return self.loaded and any(v.ready for versions in self.models.values() for v in versions.values())

    def load(self) -> None:
        root = self.settings.model_repository
        if not root.is_dir():
            event(logging.ERROR, "model repository not found", path=str(root))
            self.loaded = True
            return
        configs: dict[str, ModelConfig | str] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            versions: dict[int, ModelVersion] = {}
            for version_dir in model_dir.iterdir():
                if version_dir.is_dir() and version_dir.name.isascii() and version_dir.name.isdigit():
                    number = int(version_dir.name)
                    versions[number] = ModelVersion(model_dir.name, number, version_dir / MODEL_FILE)
                elif version_dir.is_dir():
                    event(logging.WARNING, "ignored non-integer version directory", path=str(version_dir))
            if not versions:
                continue
            self.models[model_dir.name] = dict(sorted(versions.items()))
            try:
                configs[model_dir.name] = ModelConfig.load(model_dir / CONFIG_FILE)
            except ValueError as exc:
                configs[model_dir.name] = str(exc)
        sessions = sum(len(v) for v in self.models.values())
        default_threads = self.settings.intra_op_threads or threads_per_session(self.settings.workers, sessions)
        for name, versions in self.models.items():
            for entry in versions.values():
                config = configs[name]
                if isinstance(config, str):
                    entry.reason = config
                else:
                    self._load_version(entry, config, config.intra_op_threads or default_threads)
                self.metrics.model_ready.labels(name, str(entry.version)).set(1 if entry.ready else 0)
                fields_ = {"model": name, "version": entry.version, "ready": entry.ready, "path": str(entry.path)}
                if entry.ready:
                    event(logging.INFO, "model ready", **fields_, threads=entry.runtime.threads if entry.runtime else 0,
                          batching=bool(entry.batcher and entry.batcher.batches),
                          certified=entry.certificate is not None)
                else:
                    event(logging.ERROR, "model not ready", **fields_, reason=entry.reason)
        self.loaded = True

    def _load_version(self, entry: ModelVersion, config: ModelConfig, threads: int) -> None:
        if not entry.path.is_file():
            entry.reason = f"missing {entry.path}"
            return
        try:
            runtime = ModelRuntime(entry.path, threads, spinning=self.settings.ort_spinning)
        except Exception as exc:  # onnxruntime raises several types for unreadable/invalid models
            entry.reason = f"failed to load: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            return
        try:
            entry.certificate = read(runtime.metadata)
        except ValueError as exc:
            entry.reason = f"malformed bnfold certificate: {exc}"
            return
        if entry.certificate is not None:
            entry.selftest, entry.reason = selftest.check(runtime, entry.certificate)
            if entry.reason is not None:
                return
        settings = self.settings
        delay_ms = config.max_queue_delay_ms if config.max_queue_delay_ms is not None else settings.max_queue_delay_ms
        entry.runtime = runtime
        entry.batcher = Batcher(
            f"{entry.name}/{entry.version}", runtime.run,
            batches=runtime.batches and config.dynamic_batching,
            max_batch_size=config.max_batch_size or settings.max_batch_size,
            max_queue_delay_s=delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_queue_bytes=settings.max_queue_bytes,
            observer=self.metrics.observer(entry.name),
        )
        entry.ready = True

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The named version (the newest if ``None``). Raises :class:`ModelNotFound`."""
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model {name!r:.100}; this server has {sorted(self.models)}")
        if version is None:
            return versions[max(versions)]
        number = int(version) if version.isascii() and version.isdigit() else None
        if number is None or number not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r:.40}; it has {list(versions)}")
        return versions[number]

    def close(self) -> None:
        for versions in self.models.values():
            for entry in versions.values():
                if entry.batcher is not None:
                    entry.batcher.close()
