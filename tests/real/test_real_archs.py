"""Real architectures (torchvision and timm definitions, random init, random batch-norm statistics).

Per architecture of ``benchmarks/real_archs.py`` (test ids are its names):

* ``bnfold.fold(model, example_inputs=x)`` is within ``1e-5 + 1e-4 * max|ref|`` of a float64 copy
  of the original, on every output, and reports every batch norm as folded or kept;
* the ORIGINAL model exported without fusions keeps one BatchNormalization node per torch
  batch-norm op applied (FrozenBatchNorm2d exports as Mul/Add), so the ONNX comparison is fair;
* the PyTorch fold leaves no more batch norms (applications in a forward pass) than bnfold's
  ONNX fold and onnxslim leave BatchNormalization nodes in that export: the PyTorch path is at
  least as good as the best ONNX tool;

and for the architectures marked ``cli``, ``bnfold fold`` end to end on a saved ``state_dict``
(``--model benchmarks.real_archs:build``): it succeeds, and the written file has as many
BatchNormalization nodes as its certificate says were kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from real_cases import Case

from benchmarks import real_archs as zoo
from bnfold.result import FoldResult

for _name in ("torchvision", "timm", "onnxslim"):
    pytest.importorskip(_name)
pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[2]


def _kept(result: FoldResult[Any], show: int = 3) -> str:
    """bnfold's reasons for the first ``show`` batch norms it kept, and how many it kept."""
    shown = "; ".join(f"{s.bn}: {s.reason}" for s in result.skipped[:show])
    more = f"; ... ({len(result.skipped)} kept)" if len(result.skipped) > show else ""
    return (shown + more) or "none"


def test_fold_matches_float64(case: Case) -> None:
    result = case.fold()
    comparisons = zoo.float64_error(case.model, result.model, case.inputs)
    failed = [f"output {i}: max abs error {c.max_abs:.3g} > allowed {c.allowed:.3g} (max rel {c.max_rel:.3g})"
              for i, c in enumerate(comparisons) if not c.passed]
    assert not failed, f"{case.arch.name} folded vs float64 reference: {'; '.join(failed)}"


def test_every_batchnorm_is_reported(case: Case) -> None:
    result = case.fold()
    expected = {name for name, m in case.model.named_modules() if zoo.is_batchnorm(m)}
    reported = [f.bn for f in result.folded] + [s.bn for s in result.skipped]
    missing = sorted(expected - set(reported))
    assert not missing, (f"{case.arch.name}: {len(missing)} of {len(expected)} batch norms neither folded nor kept "
                         f"({result.counts}), e.g. {', '.join(missing[:3])}")
    assert len(reported) == len(set(reported)), f"{case.arch.name}: a batch norm is reported twice: {reported}"


def test_export_keeps_every_batchnorm(case: Case) -> None:
    calls = zoo.batchnorm_calls(case.model, case.inputs)
    assert calls.total > 0, f"{case.arch.name}: no batch norm counted in the original"
    assert zoo.onnx_batchnorms(case.exported()) == calls.aten, (
        f"{case.arch.name}: {calls.aten} torch batch-norm ops applied, "
        f"{zoo.onnx_batchnorms(case.exported())} BatchNormalization nodes exported")


@pytest.mark.parametrize("tool", ["bnfold (ONNX)", "onnxslim"])
def test_pytorch_fold_leaves_no_more_batchnorms_than(case: Case, tool: str) -> None:
    result = case.fold()
    left = zoo.batchnorm_calls(result.model, case.inputs).total
    onnx_left = zoo.ONNX_TOOLS[tool](case.exported())
    assert left <= onnx_left, (
        f"{case.arch.name}: {left} of {zoo.batchnorm_calls(case.model, case.inputs).total} batch norms left "
        f"after the PyTorch fold ({result.counts}), {onnx_left} after {tool} on the exported graph; "
        f"kept: {_kept(result)}")


@pytest.mark.parametrize("arch", [a for a in zoo.ARCHS if a.cli], ids=lambda a: a.name)
def test_cli_fold_writes_what_the_certificate_says(arch: zoo.Arch, tmp_path: Path) -> None:
    import onnx
    import torch

    weights, out = tmp_path / "weights.pt", tmp_path / "folded.onnx"
    torch.save(zoo.prepared(arch).state_dict(), weights)
    config = json.dumps({"name": arch.name, "input_shape": list(arch.input_shape)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(weights), "--model", "benchmarks.real_archs:build",
         "--arch-config", config, "--samples", "16", "-o", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900, check=False)
    assert done.returncode == 0, f"bnfold fold exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    written = onnx.load(str(out))
    meta = {p.key: p.value for p in written.metadata_props}
    certificate = json.loads(meta["bnfold.certificate"])
    assert zoo.onnx_batchnorms(written) == certificate["kept"], (
        f"{arch.name}: {zoo.onnx_batchnorms(written)} BatchNormalization nodes in the file, the certificate says "
        f"{certificate['folded']} folded and {certificate['kept']} kept")
