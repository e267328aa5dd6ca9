"""What a fold returns: the rewritten model and, for every batch norm, what happened to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

M = TypeVar("M")

# Where a batch norm was decided: "pytorch" (the torch.fx rewrite), "onnx" (the ONNX rewrite of
# the exported graph), "pytorch+onnx" (kept by both); "" when a single backend ran (bnfold.fold).
Stage = Literal["", "pytorch", "onnx", "pytorch+onnx"]


@dataclass(frozen=True)
class Folded:
    """Batch norm ``bn`` was folded into layer ``into``; ``side`` says whether the BN came after
    the layer (``"output"``) or before it (``"input"``). ``node`` is the ONNX node the BN was,
    when the row was decided on an ONNX graph under another name (a PyTorch module path)."""

    bn: str
    into: str
    side: Literal["output", "input"] = "output"
    stage: Stage = ""
    node: str = ""


@dataclass(frozen=True)
class Skipped:
    """Batch norm ``bn`` was kept; ``reason`` is a sentence a user can act on. ``node`` is the
    ONNX BatchNormalization node it still is, when that is not ``bn`` itself."""

    bn: str
    reason: str
    stage: Stage = ""
    node: str = ""


@dataclass
class FoldResult(Generic[M]):
    """The folded model (same kind as the input, in inference mode) and the fold log.

    ``notes`` carries model-level remarks, e.g. that a train-mode model was folded with its
    running statistics and returned in eval mode.
    """

    model: M
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"folded": len(self.folded), "kept": len(self.skipped)}

    def rows(self) -> list[tuple[str, str, str]]:
        """One ``(bn, status, detail)`` row per batch norm, for tables and reports."""
        return [(bn, status, detail) for bn, status, _, detail in self.staged_rows()]

    def staged_rows(self) -> list[tuple[str, str, Stage, str]]:
        """One ``(bn, status, stage, detail)`` row per batch norm; a fold made in ONNX says so."""
        out: list[tuple[str, str, Stage, str]] = [
            (f.bn, "folded", f.stage, f"{'in ONNX, ' if f.stage == 'onnx' else ''}into {f.into} ({f.side} side)")
            for f in self.folded
        ]
        out += [(s.bn, "kept", s.stage, s.reason) for s in self.skipped]
        return out
