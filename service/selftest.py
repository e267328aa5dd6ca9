"""Re-check a certified model in this runtime before it may serve.

A model whose ONNX metadata carries a bnfold certificate (:mod:`bnfold.certificate`) is ready
only when its self-test input, run through the serving session, reproduces the certified output
within the certificate's tolerance ``max|y - r| <= atol + rtol * max|r|``.
"""

from __future__ import annotations

import numpy as np

from bnfold.certificate import Certificate
from bnfold.tolerance import Comparison
from service.runtime import ModelRuntime


def check(runtime: ModelRuntime, cert: Certificate) -> tuple[Comparison | None, str | None]:
    """Run the self-test; return the comparison and ``None``, or a reason it could not pass."""
    names = [spec.name for spec in runtime.inputs]
    if len(names) != 1 or names[0] != cert.input_name:
        return None, f"certificate input {cert.input_name!r} does not match the model's inputs {names}"
    if cert.output_name not in runtime.output_names:
        return None, f"certificate output {cert.output_name!r} is not among the model's outputs {runtime.output_names}"
    index = runtime.output_names.index(cert.output_name)
    try:
        comparison = cert.check(lambda x: runtime.run({cert.input_name: np.ascontiguousarray(x)})[index])
    except Exception as exc:  # onnxruntime raises several unrelated types; any failure means not ready
        return None, f"self-test could not run: {type(exc).__name__}: {exc}"
    if not comparison.passed:
        return comparison, (f"self-test output differs from the certificate: max abs error {comparison.max_abs:.3g} "
                            f"> allowed {comparison.allowed:.3g}")
    return comparison, None
