"""The real-architecture tier: torchvision and timm model definitions, each prepared and folded once.

The test modules skip themselves when torchvision, timm or onnxslim is missing (the main
environment); CI runs the tier in a second environment (``.ci/run``: ``.venv-real``). Nothing here
imports them, so collecting this directory never fails. The models, their inputs, the batch-norm
randomization and the counting helpers are those of ``benchmarks/real_archs.py``, so the tier
asserts on exactly what the benchmark table reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from real_cases import Case  # noqa: E402

from benchmarks import real_archs as zoo  # noqa: E402


@pytest.fixture(scope="module", params=zoo.ARCHS, ids=lambda arch: arch.name)
def case(request: pytest.FixtureRequest) -> Case:
    """One :class:`Case` per architecture; pytest runs every test of one architecture before the next,
    so only one model (and its folded copy and export) is held at a time."""
    return Case(request.param)
