"""One architecture of the real tier, prepared once: model, inputs, and its fold and export results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import real_archs as zoo


class Case:
    """One architecture: the prepared model (random init, random BN statistics), example inputs, and
    the fold and export results, each computed on first use; a step that raised raises again."""

    def __init__(self, arch: zoo.Arch) -> None:
        self.arch = arch
        self.model = zoo.prepared(arch)
        self.inputs = zoo.example_inputs(arch)
        self._done: dict[str, Any] = {}

    def _once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._done:
            try:
                self._done[key] = compute()
            except Exception as exc:
                self._done[key] = exc
        value = self._done[key]
        if isinstance(value, Exception):
            raise value
        return value

    def fold(self) -> Any:
        """``bnfold.fold(model, example_inputs=x)``."""
        import bnfold

        return self._once("fold", lambda: bnfold.fold(self.model, example_inputs=self.inputs))

    def exported(self) -> Any:
        """The original model in ONNX, every batch norm kept (:func:`benchmarks.real_archs.export_unfolded`)."""
        return self._once("export", lambda: zoo.export_unfolded(self.model, self.arch.input_shape))
