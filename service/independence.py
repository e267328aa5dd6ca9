"""May a model's requests share an onnxruntime run? A load-time test that its rows do not interact.

Dynamic batching concatenates the rows of several clients' requests along axis 0, runs them once and
hands each client its slice. That is correct only for a model whose output row ``i`` depends on input
row ``i`` alone: ``f([x_1; ...; x_n])_i = f(x_i)``. A model that uses batch statistics
(``y = x - mean(x, axis=0)``, a batch norm left in training mode) or mixes rows in any other way would
give client A an answer that changes with client B's concurrent rows. A dynamic first dimension in the
graph's signature says nothing about this, so :func:`probe` runs rows and compares, for every output:

1. *together vs alone*: ``n`` rows in one run against each row run alone;
2. *another composition*: the rows reversed with the first one repeated (a different batch size, order
   and content) against the same rows alone.

Outputs agree when ``max|batched - alone| <= atol + rtol * max|alone|`` (the certificate's tolerance;
float rounding differs between batch sizes), positions where both are NaN or the same infinity
counting as equal; non-numeric outputs must be equal. The rows are the certificate's self-test input
(real samples) topped up with random rows like them, or random rows of the input's shape when there is
no certificate. A test is no proof: a model that mixes rows only for some inputs can pass it, so the
operator's ``"dynamic_batching": false`` in ``config.json`` always wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnfold.certificate import Certificate
from bnfold.tolerance import Tolerance
from service.codec import DATATYPES, TensorSpec

ROWS = 4  # rows in the probe batch (the composition check runs ROWS + 1)
FREE_DIM = 4  # size given to a dynamic non-leading dimension in random rows
SEED = 0  # the probe is deterministic: the same model gets the same decision on every start

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Decision:
    """Whether a model version batches, and why (shown in model metadata and the load log)."""

    enabled: bool
    reason: str


def _random(spec: TensorSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    dtype = DATATYPES.get(spec.datatype)
    if dtype is None:
        raise ValueError(f"input {spec.name!r} has datatype {spec.datatype}, which the probe cannot generate")
    shape = (rows, *(d if d > 0 else FREE_DIM for d in spec.shape[1:]))
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)  # 0 and 1: valid flags, and indices for most integer inputs


def _like(base: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` rows: ``base``'s, then random rows with its dtype, row shape and value scale."""
    if len(base) >= rows:
        return base[:rows]
    extra = (rows - len(base), *base.shape[1:])
    if base.dtype.kind == "f":
        spread = float(np.std(base)) if base.size else 1.0
        fill = rng.normal(float(np.mean(base)) if base.size else 0.0, spread or 1.0, extra).astype(base.dtype)
    else:
        fill = rng.choice(base.reshape(-1), extra) if base.size else np.zeros(extra, base.dtype)
    return np.concatenate([base, fill])


def probe_rows(inputs: list[TensorSpec], cert: Certificate | None, rows: int = ROWS,
               seed: int = SEED) -> dict[str, np.ndarray]:
    """The probe's input batch: the certificate's self-test rows (topped up), else random rows per input."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        base = cert.selftest_input if cert is not None and spec.name == cert.input_name else None
        if base is not None and base.ndim >= 1 and len(base) >= 1:
            feeds[spec.name] = np.ascontiguousarray(_like(base, rows, rng))
        else:
            feeds[spec.name] = _random(spec, rows, rng)
    return feeds


def _disagreement(batched: np.ndarray, alone: np.ndarray, tolerance: Tolerance) -> str | None:
    """Why ``batched`` and ``alone`` (same shape) differ beyond ``tolerance``, or ``None``."""
    if batched.shape != alone.shape:
        return f"shape {list(batched.shape)} batched vs {list(alone.shape)} alone"
    if batched.dtype.kind not in "biuf" or alone.dtype.kind not in "biuf":
        return None if np.array_equal(batched, alone) else "values differ"
    a, r = batched.astype(np.float64), alone.astype(np.float64)
    same = (np.isnan(a) & np.isnan(r)) | (a == r)  # both NaN, or equal (the same infinity included)
    a, r = np.where(same, 0.0, a), np.where(same, 0.0, r)
    comparison = tolerance.compare(a, r)
    if comparison.passed:
        return None
    return f"max abs difference {comparison.max_abs:.3g} > allowed {comparison.allowed:.3g}"


def probe(run: RunFn, inputs: list[TensorSpec], output_names: list[str], cert: Certificate | None,
          tolerance: Tolerance) -> Decision:
    """Batch only if rows run together and in another composition give the answers they give alone.

    Precondition: every input and output has a dynamic first dimension. Never raises: a probe that
    cannot run (say onnxruntime rejects random rows) decides "off", with the reason.
    """
    try:
        feeds = probe_rows(inputs, cert)
        rows = len(next(iter(feeds.values())))
        alone = [run({name: x[i:i + 1] for name, x in feeds.items()}) for i in range(rows)]
        order = [*range(rows - 1, -1, -1), rows - 1]  # reversed, the last row twice: n + 1 rows
        checks = (("together", list(range(rows)), feeds),
                  ("reversed with a row repeated", order, {n: x[order] for n, x in feeds.items()}))
        for what, picked, batch in checks:
            outputs = run(batch)
            for k, name in enumerate(output_names):
                got = outputs[k]
                if got.ndim == 0 or got.shape[0] != len(picked):
                    return Decision(False, f"output {name!r} has shape {list(got.shape)} for {len(picked)} rows: "
                                           "its first dimension is not the batch")
                expected = np.concatenate([alone[i][k] for i in picked])
                problem = _disagreement(got, expected, tolerance)
                if problem is not None:
                    return Decision(False, f"rows are not independent: output {name!r} of {len(picked)} rows "
                                           f"run {what} differs from the rows run alone ({problem})")
    except Exception as exc:  # onnxruntime raises several types; no probe, no batching
        return Decision(False, f"the row-independence probe could not run: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:300]}")
    return Decision(True, f"rows are independent: {rows} rows run together and in another composition "
                          "match the rows run alone")
