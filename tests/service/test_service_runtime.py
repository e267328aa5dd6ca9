"""The model runtime (:mod:`service.runtime`): its request decoders."""

from __future__ import annotations

from pathlib import Path

from service_models import gemm_model

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
