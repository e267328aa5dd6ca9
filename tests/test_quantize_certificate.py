"""The int8 fields of the certificate: kind and a bounded, validated quantization block."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from bnfold.certificate import Certificate

QUANTIZATION: dict[str, Any] = {
    "method": "minmax", "samples": 256, "calibration_data": "digits train", "agreement": 0.9944,
    "agreement_samples": 359, "agreement_inputs": "digits validation", "float_accuracy": 0.9889,
    "int8_accuracy": 0.9889, "min_agreement": 0.99, "max_accuracy_drop": 0.005, "kept_float": ["node_conv2d"],
    "output_scale": 0.05, "float_model_sha256": "a" * 64, "float_certificate_sha256": "b" * 64,
}


def _body(**changes: Any) -> dict[str, Any]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = json.loads(Certificate(input_name="input", output_name="logits", selftest_input=x,
                                  selftest_output=x[:, :3], kind="int8", quantization=dict(QUANTIZATION)).to_json())
    body.update(changes)
    return body


def _quantization(**changes: Any) -> dict[str, Any]:
    return {**QUANTIZATION, **changes}


def test_int8_round_trip() -> None:
    cert = Certificate.from_json(json.dumps(_body()))
    assert cert.kind == "int8" and cert.quantization == QUANTIZATION


def test_a_certificate_without_kind_reads_as_float() -> None:
    body = _body()
    del body["kind"], body["quantization"]
    cert = Certificate.from_json(json.dumps(body))
    assert cert.kind == "float" and cert.quantization is None


@pytest.mark.parametrize(("body", "message"), [
    pytest.param(_body(kind="fp4"), "kind must be one of float, int8, got fp4", id="unknown-kind"),
    pytest.param(_body(kind=["int8"]), "kind must be one of", id="kind-not-a-string"),
    pytest.param(_body(kind="float"), "a float certificate carries no quantization block", id="float-with-block"),
    pytest.param(_body(quantization=None), "an int8 certificate needs a quantization object", id="int8-no-block"),
    pytest.param(_body(quantization=_quantization(method="magic")), "method must be one of minmax", id="method"),
    pytest.param(_body(quantization=_quantization(samples=-1)), "samples must be an integer from 0", id="samples"),
    pytest.param(_body(quantization=_quantization(agreement_samples=1.5)), "agreement_samples must be an integer",
                 id="agreement-samples-float"),
    pytest.param(_body(quantization=_quantization(agreement=1.01)), "agreement must be a number from 0 to 1",
                 id="agreement-over-1"),
    pytest.param(_body(quantization=_quantization(agreement=True)), "agreement must be a number", id="bool"),
    pytest.param(_body(quantization=_quantization(int8_accuracy=-0.1)), "int8_accuracy must be a number from 0",
                 id="negative-accuracy"),
    pytest.param(json.dumps(_body()).replace('"max_accuracy_drop": 0.005', '"max_accuracy_drop": 1e400'),
                 "max_accuracy_drop must be a number from 0 to 1", id="1e400"),
    pytest.param(_body(quantization=_quantization(output_scale=0)), "output_scale must be a finite number > 0",
                 id="zero-scale"),
    pytest.param(_body(quantization=_quantization(output_scale=float("nan"))), "output_scale must be a finite",
                 id="nan-scale"),
    pytest.param(_body(quantization=_quantization(calibration_data="x" * 513)), "at most 512 characters",
                 id="long-text"),
    pytest.param(_body(quantization=_quantization(kept_float=["a"] * 10_001)), "at most 10000 layer names",
                 id="many-kept"),
    pytest.param(_body(quantization=_quantization(kept_float=[{"a": 1}])), "kept_float must be a list",
                 id="kept-not-names"),
])
def test_hostile_quantization_fields_are_refused(body: dict[str, Any] | str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Certificate.from_json(body if isinstance(body, str) else json.dumps(body))


def test_accuracies_may_be_unmeasured() -> None:
    cert = Certificate.from_json(json.dumps(_body(quantization=_quantization(float_accuracy=None,
                                                                              int8_accuracy=None))))
    assert cert.quantization is not None and cert.quantization["int8_accuracy"] is None
