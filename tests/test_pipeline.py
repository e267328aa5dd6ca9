"""bnfold.pipeline: load -> fold -> verify -> export -> certify -> write, and nothing written on failure."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import bnfold
from bnfold import certificate, export, pipeline
from bnfold.archs import build_model
from bnfold.checkpoint import save_checkpoint
from bnfold.errors import BnfoldError, VerificationFailed
from bnfold.export import op_counts, to_onnx
from bnfold.layers import InputNorm
from bnfold.result import Folded, FoldResult
from bnfold.tolerance import Tolerance
from bnfold.verification import ort_runner

FAST = pipeline.Config(n_random=16, max_data=64)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained digits-shaped CNN with non-trivial batch-norm statistics, as a bnfold checkpoint."""
    return _save_cnn(tmp_path / "cnn.pt", dataset="digits")


def _save_cnn(path: Path, *, dataset: str) -> Path:
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, width=4, depth=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    save_checkpoint(path, model.eval(), arch="cnn", arch_config={"width": 4, "depth": 1}, input_shape=(1, 8, 8),
                    class_labels=[str(i) for i in range(10)], dataset=dataset, seed=0)
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_run_writes_a_certified_model_and_report(checkpoint: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "cnn.onnx", tmp_path / "report.json"
    outcome = pipeline.run(checkpoint, output=out, repository_dir=tmp_path / "repo", name="digits", report=report,
                           config=FAST)
    assert outcome.fold.counts == {"folded": 3, "kept": 0}  # two batch norms + the input normalization
    assert [c.key for c in outcome.checks] == ["pytorch/random", "pytorch/digits validation",
                                              "onnxruntime/random", "onnxruntime/digits validation"]
    assert all(c.report.passed and c.report.max_abs_error < 1e-5 for c in outcome.checks)
    assert all(c.report.top1_agreement == 1.0 for c in outcome.checks)
    written = onnx.load(str(out))
    assert "BatchNormalization" not in op_counts(written)
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").read_bytes() == out.read_bytes()

    cert = certificate.read({e.key: e.value for e in written.metadata_props})
    assert cert is not None
    assert cert.source_sha256 == pipeline.sha256_file(checkpoint)
    assert (cert.architecture, cert.input_shape, cert.folded, cert.kept) == ("cnn", [1, 8, 8], 3, 0)
    assert cert.class_labels == [str(i) for i in range(10)]
    assert cert.tolerance == Tolerance()
    assert set(cert.errors) == {c.key for c in outcome.checks}
    assert cert.selftest_input.shape == (4, 1, 8, 8)
    assert cert.check(ort_runner(written)).max_abs == 0.0  # same runtime, same bytes: bit-identical

    assert (cert.batchnorm_nodes, cert.exporter, cert.opset) == (0, "dynamo", export.opset_of(written))

    body = json.loads(report.read_text())
    assert body["onnx"]["batchnorm_nodes"] == 0
    assert body["onnx"]["opset"] == cert.opset and body["onnx"]["requested_opset"] == 17
    assert (body["onnx"]["exporter"], body["onnx"]["exporter_fallback"]) == ("dynamo", None)
    assert body["fold"]["stages"] == {"pytorch": {"folded": 3, "kept": 0}, "onnx": {"folded": 0, "kept": 0}}
    assert {row["stage"] for row in body["fold"]["batchnorms"]} == {"pytorch"}
    assert body["onnx"]["dynamic_batch"] is True
    assert body["source"]["sha256"] == cert.source_sha256
    assert body["selftest"]["passed"] is True
    assert set(body["timings_s"]) >= {"load", "fold", "verify", "export", "fold_onnx", "verify_onnx", "certify",
                                      "write"}


def _bad_fold(model: torch.nn.Module, **_: object) -> FoldResult[torch.nn.Module]:
    broken = copy.deepcopy(model).eval()
    with torch.no_grad():
        broken.head[-1].bias.add_(1e-3)  # a wrong fold: every logit off by 1e-3
    return FoldResult(broken)


@pytest.mark.parametrize(
    ("case", "config"),
    [
        pytest.param("bad-fold", FAST, id="bad-fold"),
        pytest.param("zero-tolerance", pipeline.Config(tolerance=Tolerance(0.0, 0.0), n_random=16), id="zero-tol"),
    ],
)
def test_verification_failure_writes_only_the_report(checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, case: str,
                                                     config: pipeline.Config) -> None:
    if case == "bad-fold":
        monkeypatch.setattr(bnfold, "fold", _bad_fold)
    before = _files(tmp_path)
    with pytest.raises(VerificationFailed, match=r"max abs error .* > allowed") as info:
        pipeline.run(checkpoint, output=tmp_path / "out.onnx", repository_dir=tmp_path / "repo", name="m",
                     report=tmp_path / "r.json", config=config)
    assert isinstance(info.value, pipeline.FoldFailed)
    assert _files(tmp_path) == before | {"r.json"}
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["passed"] is False and body["failure"] == " ".join(str(info.value).split())
    assert list(body["checks"]) == ["pytorch/random", "pytorch/digits validation"]  # every set, then the failure
    assert all(not c["passed"] and c["max_abs_error"] > c["allowed"] for c in body["checks"].values())
    assert body["source"]["sha256"] == pipeline.sha256_file(checkpoint) and body["fold"]["counts"]["folded"] >= 0
    assert set(body["timings_s"]) >= {"load", "fold", "verify"}


def test_a_failure_without_report_writes_nothing(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnfold, "fold", _bad_fold)
    before = _files(tmp_path)
    with pytest.raises(pipeline.FoldFailed):
        pipeline.run(checkpoint, output=tmp_path / "out.onnx", config=FAST)
    assert _files(tmp_path) == before


def test_the_model_describes_its_inputs_and_outputs(checkpoint: Path, tmp_path: Path) -> None:
    outcome = pipeline.run(checkpoint, output=tmp_path / "m.onnx", config=FAST)
    meta = {e.key: e.value for e in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta[pipeline.INPUT_SHAPE_KEY]) == [1, 8, 8]
    assert json.loads(meta[pipeline.CLASS_LABELS_KEY]) == [str(i) for i in range(10)]
    assert pipeline.FEATURE_NAMES_KEY not in meta  # images have no feature names
    assert outcome.to_dict()["passed"] is True


def test_an_onnx_file_without_certificate_counts_its_outputs(checkpoint: Path, tmp_path: Path) -> None:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=7, width=4, depth=1).eval()
    path = tmp_path / "m.onnx"
    onnx.save(to_onnx(model, (1, 8, 8)), str(path))
    source = pipeline.load_source(path)
    assert source.num_outputs == 7 and source.class_labels == []


def test_input_shape_fills_the_dynamic_axes_of_an_onnx_input(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("GlobalAveragePool", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 1, 1])])
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(BnfoldError, match=r"every axis but the first .* or give the shape to verify at with "
                       r"--input-shape"):
        pipeline.load_source(path)
    source = pipeline.load_source(path, pipeline.LoadOptions(input_shape=(3, 16, 16)))
    assert source.input_shape == [3, 16, 16] and "the graph accepts other sizes" in source.notes[0]
    with pytest.raises(BnfoldError, match=r"--input-shape 4,16,16 does not fit ONNX input 'x'"):
        pipeline.load_source(path, pipeline.LoadOptions(input_shape=(4, 16, 16)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({}, "nothing to write", id="no-destination"),
        pytest.param({"repository_dir": "r"}, "go together", id="repository-without-name"),
        pytest.param({"output": "missing-dir/x.onnx"}, "does not exist", id="missing-output-dir"),
        pytest.param({"output": "."}, "is a directory", id="output-is-dir"),
        pytest.param({"repository_dir": "r", "name": "../x"}, "model name must be", id="bad-name"),
        pytest.param({"output": "cnn.pt"}, "output 'cnn.pt' is the input file", id="output-is-the-input"),
        pytest.param({"output": "o.onnx", "report": "./o.onnx"}, "the output and the report are the same file",
                     id="report-is-the-output"),
        pytest.param({"repository_dir": "cnn.pt", "name": "m"}, "exists and is not a directory",
                     id="repository-is-a-file"),
    ],
)
def test_bad_destinations_fail_before_any_work(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               kwargs: dict, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=message):
        pipeline.run(checkpoint.name, config=FAST, **kwargs)
    assert _files(tmp_path) == before


def test_onnx_input_is_folded_with_the_onnx_rewriter(checkpoint: Path, tmp_path: Path) -> None:
    source = pipeline.load_source(checkpoint)
    unfolded = to_onnx(source.model, source.input_shape)
    assert op_counts(unfolded)["BatchNormalization"] == 2
    path = tmp_path / "unfolded.onnx"
    onnx.save(unfolded, str(path))
    outcome = pipeline.run(path, output=tmp_path / "folded.onnx", config=FAST)
    assert outcome.source.kind == "onnx"
    assert outcome.batchnorm_nodes == 0
    assert [c.key for c in outcome.checks] == ["onnxruntime/random"]
    x = np.random.default_rng(3).standard_normal((8, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = source.model.double()(torch.from_numpy(x).double()).numpy()
    got = ort_runner(onnx.load(str(tmp_path / "folded.onnx")))(x)
    assert Tolerance().compare(got, expected).passed


def test_inspect_plans_without_writing(checkpoint: Path, tmp_path: Path) -> None:
    before = _files(tmp_path)
    info = pipeline.inspect_file(checkpoint)
    assert _files(tmp_path) == before
    assert info.fold.counts == {"folded": 3, "kept": 0}
    assert info.layer_counts["BatchNorm2d"] == 2
    assert info.parameters == sum(p.numel() for p in info.source.model.parameters())
    assert json.loads(json.dumps(info.to_dict()))["input_shape"] == [1, 8, 8]


def test_compare_files_checkpoint_vs_its_export(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    pipeline.run(checkpoint, output=out, config=FAST)
    reports = pipeline.compare_files(checkpoint, out, config=FAST)
    assert [r.inputs for r in reports] == ["random", "digits validation"]
    assert all(r.passed and r.reference == "cnn.pt (float64)" for r in reports)


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match="does not exist"):
        pipeline.load_source(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(BnfoldError, match=r"is empty \(0 bytes\)"):
        pipeline.load_source(tmp_path / "empty.pt")


def test_a_moved_training_data_path_is_a_note_but_named_data_must_load(tmp_path: Path) -> None:
    moved = str(tmp_path / "gone" / "train.npz")
    path = _save_cnn(tmp_path / "cnn.pt", dataset=moved)
    outcome = pipeline.run(path, output=tmp_path / "a.onnx", config=FAST)
    assert [c.key for c in outcome.checks] == ["pytorch/random", "onnxruntime/random"]
    assert moved in outcome.notes[0]  # the others say which opset the exporter wrote
    with pytest.raises(BnfoldError):
        pipeline.run(path, output=tmp_path / "b.onnx", config=pipeline.Config(n_random=8, data=moved))
    assert not (tmp_path / "b.onnx").exists()


# ---------------------------------------------------------------------------------------------
# The artifact is what gets certified: folds made in ONNX, batch norms kept, the exporter used


class ShapeChecked(torch.nn.Module):
    """Conv -> BN -> ReLU whose forward branches on the input's shape: torch.fx cannot trace that, so
    the PyTorch fold keeps the BN; torch.export can, and the exported graph is a plain
    Conv -> BatchNormalization that the ONNX fold folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels, got {x.shape[1]}")
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            elif isinstance(m, InputNorm):
                m.scale.uniform_(0.5, 2.0)
                m.shift.uniform_(-1.0, 1.0)
    return model.eval()


def _source(model: torch.nn.Module, shape: list[int]) -> pipeline.Source:
    return pipeline.Source(Path("model.pt"), "0" * 64, "checkpoint", model, type(model).__name__, shape, [])


def _certify_and_write(model: torch.nn.Module, shape: list[int], tmp_path: Path,
                       config: pipeline.Config = FAST) -> tuple[pipeline.Outcome, onnx.ModelProto, dict]:
    outcome = pipeline.fold_and_certify(_source(model, shape), config)
    pipeline.write(outcome, output=tmp_path / "m.onnx", report=tmp_path / "r.json")
    return outcome, onnx.load(str(tmp_path / "m.onnx")), json.loads((tmp_path / "r.json").read_text())


def _certificate_of(model: onnx.ModelProto) -> certificate.Certificate:
    cert = certificate.read({e.key: e.value for e in model.metadata_props})
    assert cert is not None
    return cert


@pytest.mark.parametrize("exporter", [pytest.param("auto", id="dynamo"), pytest.param("torchscript", id="torchscript")])
def test_a_batch_norm_the_pytorch_fold_keeps_is_folded_in_onnx(tmp_path: Path, exporter: str) -> None:
    model = _randomized(ShapeChecked())
    config = pipeline.Config(n_random=16, exporter=exporter)  # type: ignore[arg-type]
    outcome, written, body = _certify_and_write(model, [3, 6, 6], tmp_path, config)
    assert outcome.stages == {"pytorch": {"folded": 0, "kept": 1}, "onnx": {"folded": 1, "kept": 0}}
    assert outcome.fold.staged_rows() == [("bn", "folded", "onnx", "in ONNX, into conv (output side)")]

    assert export.batchnorm_nodes(written) == []
    cert = _certificate_of(written)
    assert (cert.folded, cert.kept, cert.batchnorm_nodes) == (1, 0, 0)
    assert body["fold"]["counts"] == {"folded": 1, "kept": 0} and body["onnx"]["batchnorm_nodes"] == 0
    assert body["fold"]["batchnorms"] == [{"bn": "bn", "status": "folded", "stage": "onnx",
                                          "detail": "in ONNX, into conv (output side)"}]

    # The file itself, not the PyTorch fold, matches the float64 original within atol + rtol * max|r|.
    x = np.random.default_rng(5).standard_normal((9, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x).double()).numpy()
    cmp = Tolerance(atol=1e-5, rtol=1e-4).compare(ort_runner(written)(x), reference)
    assert cmp.passed, cmp
    assert all(c.report.passed for c in outcome.checks if c.stage == "onnxruntime")


@pytest.mark.parametrize(
    ("model", "batchnorm_nodes", "stage", "reasons"),
    [
        pytest.param(lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3),
                                                 torch.nn.Flatten()),
                     1, "pytorch+onnx", ["not a Conv/ConvTranspose/Linear module", "; in ONNX: "],
                     id="batch-norm-on-the-input-before-relu"),
        pytest.param(lambda: torch.nn.Sequential(InputNorm(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3),
                                                 torch.nn.Flatten()),
                     0, "pytorch", ["not a Conv/ConvTranspose/Linear module"],
                     id="input-norm-before-relu-is-mul-add"),
    ],
)
def test_a_norm_no_fold_can_fold_is_kept_and_counted_as_in_the_file(tmp_path: Path, model, batchnorm_nodes: int,
                                                                     stage: str, reasons: list[str]) -> None:
    outcome, written, body = _certify_and_write(_randomized(model()), [3, 6, 6], tmp_path)
    assert len(export.batchnorm_nodes(written)) == batchnorm_nodes
    cert = _certificate_of(written)
    assert (cert.folded, cert.kept, cert.batchnorm_nodes) == (0, 1, batchnorm_nodes)
    assert body["fold"]["counts"] == {"folded": 0, "kept": 1}
    assert body["onnx"]["batchnorm_nodes"] == batchnorm_nodes
    [(bn, status, row_stage, detail)] = outcome.fold.staged_rows()
    assert (bn, status, row_stage) == ("0", "kept", stage)
    assert all(r in detail for r in reasons), detail


def test_a_failing_dynamo_exporter_falls_back_and_says_so(checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(export, "_dynamo", broken)
    outcome = pipeline.run(checkpoint, output=tmp_path / "m.onnx", report=tmp_path / "r.json", config=FAST)
    assert outcome.exporter == "torchscript"
    assert any("TorchScript exporter" in n and "no dynamo today" in n for n in outcome.notes)
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["onnx"]["exporter"] == "torchscript" and "no dynamo today" in body["onnx"]["exporter_fallback"]
    written = onnx.load(str(tmp_path / "m.onnx"))
    cert = _certificate_of(written)
    assert (cert.exporter, cert.opset) == ("torchscript", 17) == ("torchscript", export.opset_of(written))


def test_a_fold_report_that_disagrees_with_the_graph_is_a_verification_failure(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_fold = bnfold.fold

    def lying_fold(model: object, **options: object) -> FoldResult[object]:
        result = real_fold(model, **options)
        if isinstance(model, onnx.ModelProto):  # claims the kept BatchNormalization as folded
            return FoldResult(result.model, [Folded(s.bn, "nowhere") for s in result.skipped], [])
        return result

    monkeypatch.setattr(bnfold, "fold", lying_fold)
    model = _randomized(torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3)))
    with pytest.raises(VerificationFailed, match=r"disagrees with the ONNX graph: it keeps 0 BatchNormalization nodes "
                                                 r"\(none\) but the graph has 1"):
        pipeline.fold_and_certify(_source(model, [3, 6, 6]), FAST)
