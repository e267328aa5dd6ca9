"""deploy/gpu_check.py without a GPU: what it refuses, the commands it runs, and its CPU-side comparison.

The script's GPU steps run only where torch sees a CUDA device and onnxruntime-gpu is installed;
this machine has neither, so these tests cover everything the script does that needs no GPU.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "deploy" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("cuda", "providers", "message"),
    [
        pytest.param(False, ["CUDAExecutionProvider", "CPUExecutionProvider"], "needs a CUDA GPU", id="no-gpu"),
        pytest.param(True, ["CPUExecutionProvider"], "install onnxruntime-gpu in place of onnxruntime",
                     id="no-cuda-provider"),
    ],
)
def test_missing_requirements_say_what_is_missing(gpu_check: ModuleType, cuda: bool, providers: list[str],
                                                  message: str) -> None:
    assert message in gpu_check.missing_requirements(cuda, providers)
    assert gpu_check.missing_requirements(True, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_script_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu_check: needs a CUDA GPU") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""


@pytest.mark.parametrize("gpus", [1, 2])
def test_its_training_commands_parse(gpu_check: ModuleType, gpus: int) -> None:
    from bnfold.cli import build_parser

    plan = gpu_check.runs(gpus)
    assert [name for name, _, _ in plan] == ["cuda", "amp", "ddp"][:len(plan)] and len(plan) == gpus + 1
    for _, _, options in plan:
        extra = [o.format(epochs=3) for o in gpu_check.TRAIN]
        args = build_parser().parse_args(["train", *options, *extra, "-o", "m.pt"])
        assert args.device == "cuda"


def test_the_comparison_takes_float32_noise_and_refuses_tf32_sized_errors(gpu_check: ModuleType) -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 5, (64, 10)).astype(np.float32)
    float32 = reference * (1 + rng.normal(0, 1e-7, reference.shape)).astype(np.float32)
    tf32 = reference * (1 + rng.normal(0, 1e-3, reference.shape)).astype(np.float32)  # a 10-bit mantissa
    assert gpu_check.passes(*gpu_check.compare(float32, reference))
    max_abs, allowed, _ = gpu_check.compare(tf32, reference)
    assert max_abs > allowed and not gpu_check.passes(max_abs, allowed, 1.0)
    with pytest.raises(ValueError, match="shape"):
        gpu_check.compare(reference[:3], reference)


@pytest.mark.slow
def test_serve_and_compare_on_the_cpu_provider(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The serving half of the check, run with the CPU provider standing in for the GPU."""
    from bnfold.data import load_dataset
    from bnfold.train import TrainConfig, train

    train(TrainConfig(epochs=1, arch_config={"width": 4, "depth": 1}, device="cpu"), output=tmp_path / "m.pt")
    gpu_check._bnfold("fold", "m.pt", "--repository", "models", "--name", "cpu", "--quiet", cwd=tmp_path)
    x = np.ascontiguousarray(load_dataset("digits", seed=0).X_val[:64], dtype=np.float32)
    (row,) = gpu_check.serve_and_compare(tmp_path / "models", [("cpu", "cpu")], x, providers=("CPUExecutionProvider",))
    assert row.passed, row
    assert row.providers == "CPUExecutionProvider" and row.samples == 64 and row.top1 == 1.0
    assert row.selftest.startswith("self-test passed: ")
    assert "pass" in gpu_check.table([row]).splitlines()[1]
