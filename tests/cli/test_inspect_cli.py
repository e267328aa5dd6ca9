"""``bnfold inspect``: summary and fold plan of a checkpoint or ONNX file; writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnfold import pipeline


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_inspect_checkpoint_lists_every_batch_norm(trained: dict[str, Path], run_bnfold, tmp_path: Path) -> None:
    before = _files(trained["resnet"].parent)
    proc = run_bnfold("inspect", trained["resnet"])
    assert proc.returncode == 0, proc.stderr
    plan = pipeline.inspect_file(trained["resnet"]).fold
    assert plan.counts["folded"] >= 5 and plan.counts["kept"] == 0
    n = plan.counts["folded"]
    assert f"fold plan: {n} of {n} folded, 0 kept" in proc.stdout
    for bn, _, detail in plan.rows():
        assert bn in proc.stdout and detail in proc.stdout
    assert "input shape" in proc.stdout and "(batch, 1, 8, 8)" in proc.stdout
    assert _files(trained["resnet"].parent) == before


@pytest.mark.slow
def test_inspect_certified_onnx_as_json(trained: dict[str, Path], run_bnfold, tmp_path: Path) -> None:
    out = tmp_path / "cnn.onnx"
    pipeline.run(trained["cnn"], output=out, config=pipeline.Config(n_random=8, max_data=32))
    proc = run_bnfold("inspect", out, "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["kind"] == "onnx" and body["opset"] == body["certificate"]["opset"] >= 17
    assert "BatchNormalization" not in body["layers"]
    assert body["batchnorm_nodes"] == body["certificate"]["batchnorm_nodes"] == 0
    assert body["fold_plan"] == []
    assert body["certificate"]["architecture"] == "cnn"
    assert body["certificate"]["source_sha256"] == pipeline.sha256_file(trained["cnn"])
    assert body["selftest"]["passed"] is True and body["selftest"]["max_abs_error"] == 0.0


@pytest.mark.slow
def test_inspect_shows_the_certificate_agrees_with_the_file(trained: dict[str, Path], run_bnfold,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "cnn.onnx"
    outcome = pipeline.run(trained["cnn"], output=out, config=pipeline.Config(n_random=8, max_data=32))
    proc = run_bnfold("inspect", out)
    assert proc.returncode == 0, proc.stderr
    cert = outcome.certificate
    assert _row(proc.stdout, "folded / kept") == f"{cert.folded} / {cert.kept}"
    assert _row(proc.stdout, "BatchNormalization nodes") == "0, as in the file"
    assert _row(proc.stdout, "opset, exporter") == f"{cert.opset}, {cert.exporter}"


def _row(text: str, key: str) -> str:
    """The value beside ``key`` in an indented ``key  value`` list."""
    return next(line[2 + len(key):].strip() for line in text.splitlines() if line.startswith(f"  {key}  "))


@pytest.mark.slow
def test_inspect_onnx_without_certificate_counts_its_outputs(trained: dict[str, Path], run_bnfold,
                                                             tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "cnn.onnx"
    pipeline.run(trained["cnn"], output=out, config=pipeline.Config(n_random=8, max_data=32))
    model = onnx.load(str(out))
    del model.metadata_props[:]  # an ONNX file from elsewhere: no certificate, no labels
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    proc = run_bnfold("inspect", bare)
    assert proc.returncode == 0, proc.stderr
    assert _row(proc.stdout, "outputs") == "10 (no class labels recorded)"
    assert "0 classes" not in proc.stdout
