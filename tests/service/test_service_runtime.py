"""The model runtime (:mod:`service.runtime`): its request decoders, and how it runs onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from service_models import gemm_model, gemm_reference

from service import codec
from service.runtime import DECODERS_BY_ID, ModelRuntime


def _runtime(tmp_path: Path) -> ModelRuntime:
    path = tmp_path / "model.onnx"
    path.write_bytes(gemm_model(0).SerializeToString())
    return ModelRuntime(path, threads=1)


def test_one_decoder_per_limits_found_by_identity_or_equality(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    limits = codec.Limits(max_rows=8)
    decoder = runtime.decoder(limits)
    assert runtime.decoder(limits) is decoder
    assert decoder.limits is limits
    equal = codec.Limits(max_rows=8)
    assert runtime.decoder(equal) is decoder  # equal limits share the decoder (and its remembered plans)
    other = runtime.decoder(codec.Limits(max_rows=9))
    assert other is not decoder and other.limits.max_rows == 9


def test_limits_built_per_call_do_not_grow_the_runtime(tmp_path: Path) -> None:
    """A caller building equal limits for every request holds one decoder and a bounded identity table."""
    runtime = _runtime(tmp_path)
    decoders = {id(runtime.decoder(codec.Limits(max_rows=8))) for _ in range(5 * DECODERS_BY_ID)}
    assert len(decoders) == 1
    assert len(runtime._decoders) == 1 and len(runtime._decoders_by_id) <= DECODERS_BY_ID


def test_an_identity_entry_is_not_taken_for_limits_that_reuse_a_freed_id(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    for rows in range(1, 200):  # freed limits' ids are reused by later ones: each must get its own rows
        assert runtime.decoder(codec.Limits(max_rows=rows)).limits.max_rows == rows


def test_run_through_the_binding_equals_the_public_run(tmp_path: Path) -> None:
    """A CPU session is run through onnxruntime's binding; its outputs equal the public ``run``'s, bit for bit,
    and the float64 reference within float32 tolerance."""
    runtime = _runtime(tmp_path)
    assert runtime._direct_run is not None  # (a CPU-only session, as served here)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    (got,) = runtime.run({"input": x})
    (public,) = runtime.session.run(runtime.output_names, {"input": x})
    np.testing.assert_array_equal(got, public)
    reference = gemm_reference(0, x)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 + 1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("feeds", [
    pytest.param({}, id="no-input"),
    pytest.param({"other": np.zeros((1, 4), np.float32)}, id="only-an-unknown-input"),
])
def test_a_missing_input_gets_the_public_runs_error(tmp_path: Path, feeds: dict[str, np.ndarray]) -> None:
    """The one check of onnxruntime's Python ``run`` that numpy feeds can fail is kept: without it the graph
    would run and fail in a kernel ("Missing Input" logged by onnxruntime)."""
    runtime = _runtime(tmp_path)
    with pytest.raises(ValueError, match=r"Required inputs \(\['input'\]\) are missing"):
        runtime.run(feeds)


def test_wrong_feeds_are_still_refused_by_onnxruntime(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    x = np.zeros((1, 4), np.float32)
    for feeds, message in (({"input": x, "other": x}, "Invalid input name: other"),
                           ({"input": x.astype(np.float64)}, "Unexpected input data type"),
                           ({"input": np.zeros((1, 5), np.float32)}, "invalid dimensions")):
        with pytest.raises(Exception, match=message):
            runtime.run(feeds)


def test_feeds_other_than_numpy_arrays_take_the_public_run(tmp_path: Path) -> None:
    """An OrtValue feed gets the public run's session checks: the binding is for numpy arrays only."""
    runtime = _runtime(tmp_path)
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(x)
    calls = []
    public = runtime.session.run
    runtime.session.run = lambda *args: calls.append(args) or public(*args)  # type: ignore[method-assign]
    np.testing.assert_array_equal(runtime.run({"input": value})[0], runtime.run({"input": x})[0])
    assert len(calls) == 1 and calls[0][1]["input"] is value
