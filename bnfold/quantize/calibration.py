"""Calibration and evaluation data for int8 quantization, bounded and checked before any work.

Calibration samples come from the training split of ``--calibration-data`` (a bundled name, or a
path in the formats of ``bnfold train --data``), else of the verification data (``--data``), else
of the checkpoint's own data set: the split :func:`bnfold.data.load_dataset` makes with the
checkpoint's seed, so no validation sample is ever calibrated on. At most ``samples`` of them are
used, the first ones of the (already shuffled) split.

The contract is measured on a validation split: that of the verification data (the checkpoint's
own, or ``--data``) when it loads, else that of the calibration data. Accuracy needs labels that
mean the model's outputs: the data set's class labels equal the model's (or the model records
none) and there are as many classes as outputs; otherwise only agreement is measured, and the
report says so.

Bad data is a :class:`~bnfold.errors.BnfoldError` (exit 2): samples of another shape than the
model's input, fewer than :data:`MIN_SAMPLES` samples, NaN or infinity (refused by
:func:`bnfold.data.load_dataset`), or no data at all (an ONNX file records no data set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from bnfold.pipeline import Config, Source

MIN_SAMPLES = 16  # fewer calibration samples give activation ranges of a handful of inputs
MAX_SAMPLES = 10_000  # calibration runs the model once per sample and keeps its activations' ranges
MAX_EVAL = 4096  # validation samples the contract is measured on
BATCH = 32  # calibration samples per forward pass


@dataclass
class Calibration:
    """What the quantizer calibrates on and what the contract is measured on."""

    x: np.ndarray  # calibration samples, float32, (N, *input_shape)
    name: str  # e.g. "digits train"
    eval_x: np.ndarray  # held-out samples for agreement (and accuracy)
    eval_name: str  # e.g. "digits validation"
    eval_y: np.ndarray | None  # labels meaning the model's outputs, or None: accuracy is not measured
    notes: list[str]


def calibration_for(source: Source, config: Config, samples: int, calibration_data: str | None) -> Calibration:
    """Load and check the calibration and evaluation data for ``source`` (see the module docstring)."""
    from bnfold.pipeline import load_split, own_data

    if type(samples) is not int or not MIN_SAMPLES <= samples <= MAX_SAMPLES:
        raise BnfoldError(f"--calibration-samples must be from {MIN_SAMPLES} to {MAX_SAMPLES}, got {samples}")
    verification = config.data or (own_data(source) if config.use_data else None)
    name = calibration_data or verification
    if name is None:
        what = "an ONNX file records no data set" if source.kind == "onnx" else (
            f"the checkpoint's data set {source.dataset!r} was not found" if source.dataset
            else "the checkpoint records no data set")
        raise BnfoldError(f"no calibration data: {what}; pass --calibration-data NAME|PATH "
                          "(a bundled data set, .npz, .csv or image folder, as for bnfold train --data)")
    data = _load(load_split, name, source, explicit=calibration_data is not None or config.data is not None)
    if data.X_train.shape[0] < MIN_SAMPLES:
        raise BnfoldError(f"calibration data {data.name}: its training split has {data.X_train.shape[0]} samples, "
                          f"fewer than the {MIN_SAMPLES} needed; give more data")
    notes: list[str] = []
    x = data.X_train[:samples]
    if x.shape[0] < samples:
        notes.append(f"calibrated on all {x.shape[0]} training samples of {data.name} ({samples} asked for)")
    evaluation = data
    if verification is not None and verification != name:
        try:
            evaluation = _load(load_split, verification, source, explicit=config.data is not None)
        except BnfoldError as exc:
            notes.append(f"agreement measured on {data.name} validation: the verification data did not load ({exc})")
    labels = evaluation.class_labels
    outputs = source.num_outputs
    fits = outputs == len(labels) and (not source.class_labels or list(source.class_labels) == list(labels))
    if not fits:
        notes.append(f"accuracy not measured: the labels of {evaluation.name} ({len(labels)} classes) do not "
                     f"match the model's {outputs or 'unknown'} outputs; agreement only")
    return Calibration(x=np.ascontiguousarray(x, dtype=np.float32), name=f"{data.name} train",
                       eval_x=np.ascontiguousarray(evaluation.X_val[:MAX_EVAL], dtype=np.float32),
                       eval_name=f"{evaluation.name} validation",
                       eval_y=evaluation.y_val[:MAX_EVAL] if fits else None, notes=notes)


def _load(load_split: Callable[..., Any], name: str, source: Source, *, explicit: bool) -> Any:
    try:
        return load_split(name, source, explicit=explicit)
    except BnfoldError as exc:
        raise BnfoldError(f"calibration data: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise BnfoldError(f"calibration data {name!r} cannot be read: {exc}") from None


class Reader:
    """An onnxruntime ``CalibrationDataReader`` over ``x`` in batches, reporting progress.

    onnxruntime asks for batches until ``get_next`` returns ``None``; it may ask several times
    (``rewind`` starts again).
    """

    def __init__(self, x: np.ndarray, input_name: str, progress: Callable[[str], None]) -> None:
        self.x, self.input_name, self.progress = x, input_name, progress
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.x.shape[0]:
            return None
        batch = self.x[self.position : self.position + BATCH]
        total = self.x.shape[0]
        before, self.position = self.position, self.position + batch.shape[0]
        if self.position == total or 4 * self.position // total > 4 * before // total:  # every quarter
            self.progress(f"calibrating: {self.position} of {total} samples")
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0
