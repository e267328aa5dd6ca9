"""``BNFOLD_PROVIDERS``: execution providers checked at start-up, passed to every session, and a GPU
provider that silently fell back to the CPU refused. The CUDA provider itself is exercised by
deploy/gpu_check.py on a machine with a GPU; here onnxruntime has the CPU provider only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_models import certified, gemm_model

from service import runtime
from service.config import Settings, describe
from service.main import create_app
from service.runtime import CPU, ModelRuntime, parse_providers

HAVE = ["CUDAExecutionProvider", "CPUExecutionProvider"]
REAL_SESSION = ort.InferenceSession


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("CPUExecutionProvider", (CPU,), id="cpu"),
        pytest.param(" CUDAExecutionProvider , CPUExecutionProvider ", tuple(HAVE), id="cuda-then-cpu-spaced"),
        pytest.param("CUDAExecutionProvider,", ("CUDAExecutionProvider",), id="trailing-comma"),
    ],
)
def test_parse_providers_keeps_the_order(text: str, expected: tuple[str, ...]) -> None:
    assert parse_providers(text, HAVE) == expected


@pytest.mark.parametrize(
    ("text", "available", "message"),
    [
        pytest.param("CUDAExecutionProvider,CPUExecutionProvider", [CPU],
                     "names CUDAExecutionProvider, which this onnxruntime .* does not have \\(available: "
                     "CPUExecutionProvider\\); install onnxruntime-gpu in place of onnxruntime", id="no-gpu-build"),
        pytest.param(" , ", HAVE, "must name at least one execution provider", id="empty"),
        pytest.param("CPUExecutionProvider,CPUExecutionProvider", HAVE, "names CPUExecutionProvider more than once",
                     id="repeated"),
        pytest.param("cpu", HAVE, "names cpu, which", id="not-a-provider-name"),
    ],
)
def test_parse_providers_refuses(text: str, available: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_providers(text, available)


def test_a_missing_provider_is_a_start_up_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNFOLD_PROVIDERS", "CUDAExecutionProvider,CPUExecutionProvider")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ValidationError) as info:
        Settings()
    line = describe(info.value)
    assert line.startswith("BNFOLD_PROVIDERS='CUDAExecutionProvider,CPUExecutionProvider': names "
                           "CUDAExecutionProvider, which this onnxruntime"), line
    assert "install onnxruntime-gpu" in line


def test_default_is_the_cpu_and_sessions_report_what_started(tmp_path: Path) -> None:
    assert Settings().provider_list == (CPU,)
    path = tmp_path / "m.onnx"
    path.write_bytes(gemm_model(1).SerializeToString())
    assert ModelRuntime(path, 1).providers == (CPU,)
    assert ModelRuntime(path, 1, providers=[CPU]).providers == (CPU,)


class _FellBack:
    """An InferenceSession stand-in that, like onnxruntime without a working GPU, started the CPU only."""

    def __init__(self, *args: Any, providers: list[Any], **kwargs: Any) -> None:
        self.requested = providers
        self.inner = REAL_SESSION(*args, providers=[CPU], **kwargs)

    def get_providers(self) -> list[str]:
        return [CPU]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_gpu_provider_that_fell_back_to_the_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(gemm_model(1).SerializeToString())
    created: list[_FellBack] = []

    def session(*args: Any, **kwargs: Any) -> _FellBack:
        created.append(_FellBack(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    with pytest.raises(ValueError, match="execution provider CUDAExecutionProvider did not start \\(onnxruntime "
                                         "fell back to CPUExecutionProvider\\)"):
        ModelRuntime(path, 1, providers=HAVE)
    # CUDA asked for IEEE float32 (no TF32), so the certificate's float32 tolerance applies on the GPU
    assert created[0].requested == [("CUDAExecutionProvider", {"use_tf32": "0"}), (CPU, {})]


def test_the_service_serves_on_the_configured_providers(tmp_path: Path) -> None:
    (tmp_path / "classifier" / "1").mkdir(parents=True)
    (tmp_path / "classifier" / "1" / "model.onnx").write_bytes(certified(gemm_model(1), 1).SerializeToString())
    settings = Settings(model_repository=tmp_path, intra_op_threads=1, providers="CPUExecutionProvider")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/classifier/ready").status_code == 200
        served = client.app.state.service.repository.models["classifier"][1].runtime  # type: ignore[attr-defined]
        assert served.providers == (CPU,)


def test_the_repository_passes_the_configured_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each app's settings choose its sessions' providers (no process-wide state between apps)."""
    (tmp_path / "classifier" / "1").mkdir(parents=True)
    (tmp_path / "classifier" / "1" / "model.onnx").write_bytes(certified(gemm_model(1), 1).SerializeToString())
    asked: list[tuple[str, ...]] = []
    real = runtime.ModelRuntime.__init__

    def spy(self: ModelRuntime, *args: Any, providers: Any = None, **kwargs: Any) -> None:
        asked.append(tuple(providers))
        real(self, *args, providers=(CPU,), **kwargs)

    monkeypatch.setattr(runtime.ModelRuntime, "__init__", spy)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    settings = Settings(model_repository=tmp_path, intra_op_threads=1,
                        providers="CUDAExecutionProvider,CPUExecutionProvider")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/classifier/ready").status_code == 200
    assert asked and all(p == ("CUDAExecutionProvider", CPU) for p in asked)
