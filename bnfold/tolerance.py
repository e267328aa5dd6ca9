"""The equivalence tolerance used everywhere: absolute plus relative to the output scale.

An output ``y`` matches a reference ``r`` when ``max|y - r| <= atol + rtol * max|r|``. The
relative term scales with the largest reference magnitude (the output scale), not element-wise,
so near-zero logits do not make the check meaningless. numpy only: the service uses it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-5  # absolute part, in output units
    rtol: float = 1e-4  # relative part, times max |reference|

    def allowed(self, reference: ArrayLike) -> float:
        ref = np.asarray(reference, dtype=np.float64)
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        return self.atol + self.rtol * scale

    def compare(self, actual: ArrayLike, reference: ArrayLike) -> Comparison:
        """Compare two arrays of the same shape. Raises ``ValueError`` on a shape mismatch.

        Comparing no elements never passes: an empty comparison shows nothing.
        """
        a = np.asarray(actual, dtype=np.float64)
        r = np.asarray(reference, dtype=np.float64)
        if a.shape != r.shape:
            raise ValueError(f"output shapes differ: {a.shape} vs reference {r.shape}")
        diff = np.abs(a - r)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        allowed = self.allowed(r)
        finite = bool(np.all(np.isfinite(a)) == np.all(np.isfinite(r)))
        return Comparison(max_abs=max_abs, max_rel=max_rel, allowed=allowed,
                          passed=finite and a.size > 0 and max_abs <= allowed)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    max_abs: float  # max |actual - reference|
    max_rel: float  # max_abs / max |reference|
    allowed: float  # atol + rtol * max |reference|
    passed: bool
