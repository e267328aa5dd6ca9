"""``bnfold fold`` driven as a user would: every architecture, ONNX input, every bad input."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bnfold import certificate
from bnfold.checkpoint import load_model
from bnfold.export import op_counts, to_onnx
from bnfold.tolerance import Tolerance
from bnfold.verification import ort_runner

ARCHS = ["cnn", "mlp", "resnet", "mobilenet", "conv1d"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in ARCHS])
def test_fold_every_architecture(arch: str, trained: dict[str, Path], run_bnfold, tmp_path: Path) -> None:
    out, report = tmp_path / "model.onnx", tmp_path / "report.json"
    proc = run_bnfold("fold", trained[arch], "-o", out, "--report", report, "--repository", tmp_path / "repo",
                      "--name", arch)
    assert proc.returncode == 0, proc.stderr
    assert "batch norms:" in proc.stdout and "verification" in proc.stdout

    model = onnx.load(str(out))
    assert "BatchNormalization" not in op_counts(model)
    assert (tmp_path / "repo" / arch / "1" / "model.onnx").read_bytes() == out.read_bytes()

    # onnxruntime (optimizations off) reproduces PyTorch's original model within the default tolerance.
    loaded = load_model(trained[arch])
    x = np.random.default_rng(7).standard_normal((16, *loaded.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(x)).numpy()
    run = ort_runner(model)
    cmp = Tolerance().compare(run(x), expected)
    assert cmp.passed, cmp

    # The certificate describes the run and its self-test vector reproduces in onnxruntime.
    cert = certificate.read({e.key: e.value for e in model.metadata_props})
    assert cert is not None
    assert cert.architecture == arch
    assert cert.input_shape == list(loaded.input_shape)
    assert cert.class_labels == loaded.class_labels
    assert cert.kept == 0 and cert.folded >= 2
    assert cert.batchnorm_nodes == 0 and cert.opset == model.opset_import[0].version
    assert cert.check(run).passed

    body = json.loads(report.read_text())
    checks = body["checks"]
    dataset = loaded.dataset
    assert set(checks) == {"pytorch/random", f"pytorch/{dataset} validation", "onnxruntime/random",
                           f"onnxruntime/{dataset} validation"}
    for check in checks.values():
        assert check["passed"] and check["max_abs_error"] <= check["allowed"]
        assert check["top1_agreement"] == 1.0
    assert body["onnx"]["batchnorm_nodes"] == 0 and body["onnx"]["dynamic_batch"] is True
    assert body["fold"]["counts"] == {"folded": cert.folded, "kept": 0}
    assert body["onnx"]["exporter"] == cert.exporter == "dynamo" and body["onnx"]["opset"] == cert.opset


@pytest.mark.slow
def test_fold_onnx_input(trained: dict[str, Path], run_bnfold, tmp_path: Path) -> None:
    loaded = load_model(trained["resnet"])
    unfolded = tmp_path / "unfolded.onnx"
    onnx.save(to_onnx(loaded.model, loaded.input_shape), str(unfolded))
    proc = run_bnfold("fold", unfolded, "-o", tmp_path / "folded.onnx")
    assert proc.returncode == 0, proc.stderr
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert "BatchNormalization" not in op_counts(folded)
    x = np.random.default_rng(1).standard_normal((8, *loaded.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(x)).numpy()
    assert Tolerance().compare(ort_runner(folded)(x), expected).passed
    cert = certificate.read({e.key: e.value for e in folded.metadata_props})
    assert cert is not None and cert.check(ort_runner(folded)).passed


class _RunsCode:
    """Unpickling this would create the marker file; bnfold must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _bad_input(kind: str, tmp: Path, trained: dict[str, Path]) -> tuple[Path, list[str]]:
    """Create the bad input ``kind`` in ``tmp``; return its path and extra CLI arguments."""
    state = load_model(trained["cnn"]).model.state_dict()
    path = tmp / "model.pt"
    extra: list[str] = []
    if kind == "missing":
        path = tmp / "nope.pt"
    elif kind == "directory":
        path = tmp / "adir"
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(trained["cnn"].read_bytes()[:2000])
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "random-onnx":
        path = tmp / "model.onnx"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "checker-onnx":
        path = tmp / "model.onnx"
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["missing"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    elif kind == "unknown-arch":
        torch.save(state, path)
        extra = ["--arch", "transformer9000"]
    elif kind == "missing-keys":
        torch.save({k: v for k, v in state.items() if not k.startswith("features.1.")}, path)
        extra = ["--arch", "cnn", "--input-shape", "1,8,8", "--arch-config", '{"width": 4, "depth": 1}']
    elif kind == "unexpected-keys":
        torch.save({**state, "extra.weight": torch.zeros(3)}, path)
        extra = ["--arch", "cnn", "--input-shape", "1,8,8", "--arch-config", '{"width": 4, "depth": 1}']
    elif kind == "shape-mismatch":
        torch.save(state, path)
        extra = ["--arch", "cnn", "--input-shape", "1,8,8", "--arch-config", '{"width": 8, "depth": 1}']
    elif kind == "bare-state-dict":
        torch.save(state, path)
    elif kind == "no-input-shape":
        torch.save(state, path)
        extra = ["--arch", "cnn", "--arch-config", '{"width": 4, "depth": 1}']
    elif kind == "bad-input-shape":
        torch.save(state, path)
        extra = ["--arch", "cnn", "--input-shape", "1,8", "--arch-config", '{"width": 4, "depth": 1}']
    elif kind == "bad-arch-config":
        torch.save(state, path)
        extra = ["--arch", "cnn", "--arch-config", "{width: 4"]
    elif kind == "pickle-with-code":
        with path.open("wb") as fh:
            pickle.dump({"state_dict": _RunsCode(tmp / "MARKER")}, fh)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path, extra


BAD_INPUTS = [
    pytest.param("missing", "does not exist", id="missing-file"),
    pytest.param("directory", "is a directory", id="directory"),
    pytest.param("empty", "empty", id="empty-checkpoint"),
    pytest.param("truncated", "truncated", id="truncated-checkpoint"),
    pytest.param("text", "text file", id="text-file"),
    pytest.param("random-onnx", "not a valid ONNX model", id="random-bytes-onnx"),
    pytest.param("checker-onnx", "fails the ONNX checker", id="onnx-fails-checker"),
    pytest.param("unknown-arch", "unknown architecture 'transformer9000'", id="unknown-arch"),
    pytest.param("missing-keys", "missing key", id="state-dict-missing-keys"),
    pytest.param("unexpected-keys", "unexpected key", id="state-dict-unexpected-keys"),
    pytest.param("shape-mismatch", "shape mismatch", id="state-dict-shape-mismatch"),
    pytest.param("bare-state-dict", "--arch", id="bare-state-dict-no-arch"),
    pytest.param("no-input-shape", "does not record the input shape it was trained on; its first layer takes 1 "
                 "channel(s), but the cnn weights fit any image size; give it with --input-shape 1,H,W",
                 id="bare-state-dict-no-input-shape"),
    pytest.param("bad-input-shape", "cnn expects inputs of shape (channels, height, width), got (1, 8)",
                 id="input-shape-of-the-wrong-rank"),
    pytest.param("bad-arch-config", "--arch-config is not valid JSON", id="bad-arch-config"),
    pytest.param("pickle-with-code", "refused", id="pickle-with-code"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(kind: str, message: str, trained: dict[str, Path], run_bnfold,
                                                      tmp_path: Path) -> None:
    path, extra = _bad_input(kind, tmp_path, trained)
    before = _files(tmp_path)
    proc = run_bnfold("fold", path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "report.json",
                      "--repository", tmp_path / "repo", "--name", "m", "--quiet", *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert _files(tmp_path) == before  # nothing written (and no MARKER: the pickle never ran)


@pytest.mark.slow
def test_debug_shows_the_traceback(run_bnfold, tmp_path: Path) -> None:
    proc = run_bnfold("fold", tmp_path / "nope.pt", "-o", tmp_path / "out.onnx", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


@pytest.mark.slow
def test_verification_failure_exits_1_and_writes_only_the_report(trained: dict[str, Path], run_bnfold,
                                                                  tmp_path: Path) -> None:
    before = _files(tmp_path)
    proc = run_bnfold("fold", trained["cnn"], "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json",
                      "--repository", tmp_path / "repo", "--name", "m", "--atol", "0", "--rtol", "0", "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("bnfold: error: verification failed") and len(proc.stderr.splitlines()) == 1
    assert _files(tmp_path) == before | {"r.json"}  # no model, no repository version
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["passed"] is False and body["failure"].startswith("verification failed against original (float64)")
    checks = body["checks"]
    assert set(checks) == {"pytorch/random", "pytorch/digits validation"}  # both measured before failing
    for check in checks.values():
        assert check["passed"] is False and check["max_abs_error"] > check["allowed"] == 0.0
        assert len(check["rows"]) == 3  # the full matrix: deciding row and both baselines
    assert body["fold"]["counts"]["folded"] >= 2 and body["written"] == [str(tmp_path / "r.json")]
    assert "verification: FAILED, 2 of 2 checks over the allowed error" in proc.stdout
    assert f"wrote {tmp_path / 'r.json'} (passed: false" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    "args",
    [pytest.param(["fold", "x.pt"], id="no-destination"),
     pytest.param(["fold", "x.pt", "--repository", "r"], id="repository-without-name"),
     pytest.param(["fold", "x.pt", "-o", "y.onnx", "--atol", "-1"], id="negative-atol")],
)
def test_usage_errors_exit_2(args: list[str], run_bnfold, tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"irrelevant")
    proc = run_bnfold(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bnfold: error: ") and len(proc.stderr.splitlines()) == 1


FACTORY = '''
from torch import nn


def build(width=6):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
'''


FACTORY_CASES = [
    pytest.param(".", "mymodels:build", ["--input-shape", "3,10,10"], id="module-in-the-current-directory"),
    pytest.param(".", "mymodels:build", ["--arch-config", '{"input_shape": [3, 10, 10]}'], id="shape-in-arch-config"),
    pytest.param("src", "src/mymodels.py:build", ["--input-shape", "3x10x10"], id="path-to-a-python-file"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "factory", "shape"), FACTORY_CASES)
def test_fold_state_dict_with_own_model_factory(run_bnfold, tmp_path: Path, folder: str, factory: str,
                                                shape: list[str]) -> None:
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / "mymodels.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    # the console script, without PYTHONPATH: the current directory is not on its module path by itself
    proc = run_bnfold("fold", "weights.pt", "--model", factory, *shape, "-o", "out.onnx", cwd=tmp_path,
                      env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "input 3x10x10" in proc.stdout
    exported = onnx.load(str(tmp_path / "out.onnx"))
    assert "BatchNormalization" not in op_counts(exported)
    x = np.random.default_rng(0).standard_normal((8, 3, 10, 10)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval().double()(torch.from_numpy(x).double()).numpy()
    assert Tolerance().compare(ort_runner(exported)(x), expected).passed


def test_a_bad_fold_exits_1_and_writes_only_the_report(trained: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import copy

    import bnfold
    from bnfold.cli import main
    from bnfold.result import FoldResult

    def bad_fold(model: torch.nn.Module, **_: object) -> FoldResult[torch.nn.Module]:
        broken = copy.deepcopy(model).eval()
        with torch.no_grad():
            broken.head[-1].weight.mul_(1.001)  # a fold with a 0.1 % scale error
        return FoldResult(broken)

    monkeypatch.setattr(bnfold, "fold", bad_fold)
    before = _files(tmp_path)
    code = main(["fold", str(trained["cnn"]), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
                 "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error: verification failed against original (float64)")
    assert _files(tmp_path) == before | {"r.json"}
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


SHAPE_CHECKED = '''
import torch
from torch import nn


class ShapeChecked(nn.Module):
    """torch.fx cannot trace the shape check, so the PyTorch fold keeps bn; the ONNX fold folds it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(input_shape=(3, 6, 6)):
    model = ShapeChecked()
    model.input_shape = tuple(input_shape)
    return model
'''


def _shape_checked_state(tmp_path: Path) -> Path:
    import sys

    (tmp_path / "shapechecked.py").write_text(SHAPE_CHECKED)
    sys.path.insert(0, str(tmp_path))
    try:
        import shapechecked  # type: ignore[import-not-found]

        torch.manual_seed(0)
        model = shapechecked.build()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.3, 0.3)
        torch.save(model.state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("shapechecked", None)
    return tmp_path / "weights.pt"


@pytest.mark.slow
@pytest.mark.parametrize("exporter", [pytest.param([], id="default"), pytest.param(["--exporter", "torchscript"],
                                                                                    id="torchscript")])
def test_fold_table_says_a_batch_norm_was_folded_in_onnx(run_bnfold, tmp_path: Path, exporter: list[str]) -> None:
    _shape_checked_state(tmp_path)
    proc = run_bnfold("fold", "weights.pt", "--model", "shapechecked:build", "-o", "out.onnx", "--report", "r.json",
                      "--verbose", *exporter, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("  bn "))
    assert re.split(r"\s{2,}", row.strip()) == ["bn", "folded", "ONNX", "in ONNX, into conv (output side)"]
    assert "batch norms: 1 of 1 folded (1 in ONNX), 0 kept" in proc.stdout
    assert re.search(r"^  BatchNormalization nodes +0$", proc.stdout, flags=re.MULTILINE)
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert "BatchNormalization" not in op_counts(written)
    cert = certificate.read({e.key: e.value for e in written.metadata_props})
    assert cert is not None and (cert.folded, cert.kept, cert.batchnorm_nodes) == (1, 0, 0)
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["fold"]["stages"] == {"pytorch": {"folded": 0, "kept": 1}, "onnx": {"folded": 1, "kept": 0}}
    assert body["onnx"]["exporter"] == ("torchscript" if exporter else "dynamo")
    if not exporter:  # the dynamo exporter keeps opset 18 for this graph, and the output says so
        assert body["onnx"]["opset"] == cert.opset == 18
        assert "18 (17 asked for)" in proc.stdout and "not the 17 asked for" in proc.stdout


@pytest.mark.slow
def test_fold_says_when_it_fell_back_to_the_torchscript_exporter(trained: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from bnfold import export
    from bnfold.cli import main

    def broken(*_: object) -> None:
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(export, "_dynamo", broken)
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["fold", str(trained["cnn"]), "-o", str(tmp_path / "out.onnx")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: exported with the deprecated TorchScript exporter because ONNX export (dynamo) failed: no " \
           "dynamo today" in out
    assert "exporter torchscript (fallback, see note)" in out
