"""What a fold returns: the rewritten model and, for every batch norm, what happened to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

M = TypeVar("M")


@dataclass(frozen=True)
class Folded:
    """Batch norm ``bn`` was folded into layer ``into``; ``side`` says whether the BN came after
    the layer (``"output"``) or before it (``"input"``)."""

    bn: str
    into: str
    side: Literal["output", "input"] = "output"


@dataclass(frozen=True)
class Skipped:
    """Batch norm ``bn`` was kept; ``reason`` is a sentence a user can act on."""

    bn: str
    reason: str


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
        out = [(f.bn, "folded", f"into {f.into} ({f.side} side)") for f in self.folded]
        out += [(s.bn, "kept", s.reason) for s in self.skipped]
        return out
