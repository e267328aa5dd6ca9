"""bnfold: fold batch normalization into neighbouring layers exactly, verify, export, serve.

Public API::

    result = bnfold.fold(model)                       # torch.nn.Module or onnx.ModelProto
    report = bnfold.verify(original, folded, inputs)  # max abs/rel error, top-1 agreement, pass/fail

Heavy dependencies (torch, onnx) are imported on first use, so the serving runtime can import
``bnfold.certificate`` without torch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold._version import __version__
from bnfold.errors import BnfoldError, VerificationFailed
from bnfold.result import Folded, FoldResult, Skipped
from bnfold.tolerance import Tolerance

if TYPE_CHECKING:
    from bnfold.verification import VerifyReport

__all__ = [
    "BnfoldError",
    "FoldResult",
    "Folded",
    "Skipped",
    "Tolerance",
    "VerificationFailed",
    "__version__",
    "fold",
    "verify",
]


def fold(model: Any, **options: Any) -> FoldResult[Any]:
    """Fold every batch norm that can be folded exactly; keep the others with a reason.

    ``model`` is a ``torch.nn.Module`` or an ``onnx.ModelProto``; it is not modified. The result's
    ``model`` is of the same kind, in inference mode, and computes the same function.
    ``options`` are passed to the backend (e.g. ``example_inputs=`` for PyTorch).
    """
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx" or type(model).__name__ == "ModelProto":
        from bnfold.fold_onnx import fold_onnx

        return fold_onnx(model, **options)
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(model, torch.nn.Module):
        from bnfold.fold_torch import fold_torch

        return fold_torch(model, **options)
    raise TypeError(f"bnfold.fold expects a torch.nn.Module or an onnx.ModelProto, got {type(model).__name__}")


def verify(original: Any, folded: Any, inputs: Any, **options: Any) -> VerifyReport:
    """Compare two models on ``inputs``: max abs/rel error, top-1 agreement, pass/fail.

    See :func:`bnfold.verification.verify` for the options (tolerance, float64 reference).
    """
    from bnfold.verification import verify as _verify

    return _verify(original, folded, inputs, **options)
