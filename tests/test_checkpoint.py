"""Checkpoints: the weights_only format, every way to load a model, and every bad-file error."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnfold.archs import build_model
from bnfold.checkpoint import FORMAT, FORMAT_VERSION, load_model, save_checkpoint
from bnfold.errors import BnfoldError
from bnfold.layers import InputNorm


def _model(seed: int = 0, **config: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=4, width=4, depth=1, **config)
    norm = InputNorm.from_stats([3.0], [2.0])
    model.get_submodule("input_norm").load_state_dict(norm.state_dict())
    # Non-trivial running statistics, as after training.
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8) * 4 + 5)
    return model.eval()


def _save(path: Path, model: nn.Module) -> str:
    return save_checkpoint(
        path, model, arch="cnn", arch_config={"width": 4, "depth": 1, "norm": "bn"}, input_shape=(1, 8, 8),
        class_labels=["a", "b", "c", "d"], dataset="digits", seed=3, input_norm={"mean": [3.0], "std": [2.0]},
        metrics={"history": [{"epoch": 1.0, "val_accuracy": 0.5}], "best_epoch": 1},
    )


def test_round_trip_rebuilds_the_same_function(tmp_path: Path) -> None:
    model = _model()
    sha = _save(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(6, 1, 8, 8) * 4 + 5
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert not loaded.model.training
    assert loaded.model.input_shape == (1, 8, 8) == loaded.input_shape
    assert loaded.arch == "cnn" and loaded.arch_config == {"width": 4, "depth": 1, "norm": "bn"}
    assert loaded.class_labels == ["a", "b", "c", "d"] and loaded.dataset == "digits"
    assert loaded.meta["seed"] == 3 and loaded.meta["metrics"]["best_epoch"] == 1
    assert loaded.meta["input_norm"] == {"mean": [3.0], "std": [2.0]}
    assert loaded.sha256 == sha == hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_file_is_a_plain_dict_for_weights_only_load(tmp_path: Path) -> None:
    model = _model()
    _save(tmp_path / "m.pt", model)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert {"arch", "arch_config", "state_dict", "input_shape", "class_labels", "input_norm", "metrics",
            "bnfold_version", "seed", "dataset"} <= set(raw)
    running = [k for k in raw["state_dict"] if k.endswith("running_var")]
    assert running
    torch.testing.assert_close(raw["state_dict"][running[0]], model.state_dict()[running[0]], rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # atomic: no temporary left behind


@pytest.mark.parametrize(
    ("payload", "arch_config"),
    [
        pytest.param("bare", {"width": 4, "depth": 1, "input_shape": [1, 8, 8]}, id="bare-state-dict"),
        pytest.param("wrapped", {"width": 4, "depth": 1, "input_shape": [1, 8, 8], "num_classes": 4},
                     id="state-dict-wrapper-with-shapes"),
    ],
)
def test_state_dict_plus_arch_name(tmp_path: Path, payload: str, arch_config: dict[str, Any]) -> None:
    model = _model()
    state = model.state_dict()
    torch.save(state if payload == "bare" else {"state_dict": state, "epoch": 3}, tmp_path / "s.pt")
    loaded = load_model(tmp_path / "s.pt", arch="cnn", arch_config=arch_config)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert loaded.class_labels == ["0", "1", "2", "3"] and loaded.input_shape == (1, 8, 8)
    assert loaded.arch == "cnn" and loaded.dataset is None


def test_state_dict_without_bn_infers_norm_none(tmp_path: Path) -> None:
    model = _model(norm="none")
    torch.save(model.state_dict(), tmp_path / "s.pt")
    loaded = load_model(tmp_path / "s.pt", arch="cnn", arch_config={"width": 4, "depth": 1}, input_shape=(1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_a_bare_conv_state_dict_needs_its_input_shape(tmp_path: Path) -> None:
    """A 3x32x32 CNN's weights fit 3x8x8 inputs too: the size is asked for, never guessed."""
    model = build_model("cnn", input_shape=(3, 32, 32), num_classes=4, width=4, depth=1)
    torch.save(model.state_dict(), tmp_path / "s.pt")
    with pytest.raises(BnfoldError, match=r"s\.pt: a bare state_dict does not record the input shape it was trained "
                       r"on; its first layer takes 3 channel\(s\), but the cnn weights fit any image size; give it "
                       r"with --input-shape 3,H,W$"):
        load_model(tmp_path / "s.pt", arch="cnn", arch_config={"width": 4, "depth": 1})
    loaded = load_model(tmp_path / "s.pt", arch="cnn", arch_config={"width": 4, "depth": 1}, input_shape=[3, 32, 32])
    assert loaded.input_shape == (3, 32, 32) and loaded.notes == []


def test_a_bare_mlp_state_dict_has_its_input_shape_in_its_weights(tmp_path: Path) -> None:
    model = build_model("mlp", input_shape=(30,), num_classes=2, width=8, depth=2)
    torch.save(model.state_dict(), tmp_path / "s.pt")
    loaded = load_model(tmp_path / "s.pt", arch="mlp", arch_config={"width": 8, "depth": 2})
    assert loaded.input_shape == (30,)


def test_input_shape_overrides_the_checkpoint_and_says_so(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", _model())
    loaded = load_model(tmp_path / "m.pt", input_shape=(1, 16, 16))
    assert loaded.input_shape == (1, 16, 16)
    assert loaded.notes == ["input shape 1x16x16 from --input-shape; the checkpoint was trained on 1x8x8"]


FACTORY = """
from torch import nn

def tiny(hidden=5):
    model = nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))
    model.input_shape = (3,)
    return model

def shapeless():
    return nn.Sequential(nn.Linear(3, 2))

def not_a_model():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_models_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory_plus_state_dict(tmp_path: Path, factory_module: str) -> None:
    module = __import__(factory_module)
    torch.manual_seed(0)
    model = module.tiny(hidden=6).eval()
    torch.save(model.state_dict(), tmp_path / "u.pt")
    loaded = load_model(tmp_path / "u.pt", model_factory=f"{factory_module}:tiny", arch_config={"hidden": 6})
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert loaded.arch == f"{factory_module}:tiny" and loaded.input_shape == (3,)
    assert loaded.class_labels == ["0", "1"]


# ---- bad files ----------------------------------------------------------------------------------



@pytest.mark.parametrize("spec", [pytest.param("{name}:tiny", id="module-in-the-current-directory"),
                                  pytest.param("src/{name}.py:tiny", id="relative-file-path"),
                                  pytest.param("{tmp}/src/{name}.py:tiny", id="absolute-file-path")])
def test_user_factory_from_the_current_directory_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          spec: str) -> None:
    name = f"cwd_models_{os.getpid()}"
    folder = tmp_path if spec.startswith("{name}") else tmp_path / "src"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).eval()
    torch.save(model.state_dict(), tmp_path / "u.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as the console script
    try:
        loaded = load_model("u.pt", model_factory=spec.format(name=name, tmp=tmp_path))
    finally:
        sys.modules.pop(name, None)
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert str(tmp_path) not in sys.path and "" not in sys.path  # the module path is as it was

class _RunsCode:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "container", [pytest.param("torch-zip", id="torch-save"), pytest.param("raw", id="raw-pickle")]
)
def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "hook": _RunsCode(marker)}
    if container == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(BnfoldError, match=r"refused: file contains pickled code") as info:
        load_model(path, arch="cnn")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def _bad(tmp_path: Path, case: str) -> tuple[Path, dict[str, Any]]:
    good = _model().state_dict()
    path = tmp_path / "c.pt"
    if case == "missing":
        return tmp_path / "absent.pt", {}
    if case == "directory":
        return tmp_path, {}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        _save(path, _model())
        path.write_bytes(path.read_bytes()[:300])
    elif case == "text":
        path.write_text("this is a README, not a model\n")
    elif case == "binary-junk":
        path.write_bytes(bytes(range(7, 200)))
    elif case == "torchscript":
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
    elif case == "whole-module":
        torch.save(nn.Linear(2, 2), path)
    elif case == "not-a-state-dict":
        torch.save([1, 2, 3], path)
    elif case == "empty-state-dict":
        torch.save({}, path)
    elif case == "newer-format":
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "state_dict": good}, path)
    elif case == "no-arch":
        torch.save(good, path)
        return path, {}
    elif case == "unknown-arch":
        torch.save(good, path)
        return path, {"arch": "vgg16"}
    elif case == "mismatch":
        state = dict(good)
        state.pop("features.0.weight")
        state.pop("features.1.weight")
        state["extra.weight"] = torch.zeros(2)
        state["head.2.weight"] = torch.zeros(7, 4)
        torch.save(state, path)
        return path, {"arch": "cnn", "arch_config": {"width": 4, "depth": 1, "num_classes": 4},
                      "input_shape": [1, 8, 8]}
    elif case == "wrong-width":
        torch.save(good, path)
        return path, {"arch": "cnn", "arch_config": {"width": 8, "depth": 1}, "input_shape": (1, 8, 8)}
    elif case == "bad-factory":
        torch.save(good, path)
        return path, {"model_factory": "no_such_pkg_xyz.models:make"}
    elif case == "malformed-factory":
        torch.save(good, path)
        return path, {"model_factory": "just_a_name"}
    return path, {"arch": "cnn"}


BAD = [
    pytest.param("missing", r"checkpoint '.*absent\.pt' does not exist", id="missing-file"),
    pytest.param("directory", r"is a directory, not a file", id="directory"),
    pytest.param("empty", r"is empty \(0 bytes\)", id="empty-file"),
    pytest.param("truncated", r"is truncated or corrupted \(300 bytes\)", id="truncated"),
    pytest.param("text", r"is a text file, not a PyTorch checkpoint", id="text-file"),
    pytest.param("binary-junk", r"not a PyTorch checkpoint \(unrecognized file header\)", id="binary-junk"),
    pytest.param("torchscript", r"is a TorchScript archive; bnfold needs a state_dict", id="torchscript"),
    pytest.param("whole-module", r"refused: file contains pickled code \(torch\.nn\.modules\.linear\.Linear\)",
                 id="pickled-module"),
    pytest.param("not-a-state-dict", r"not a bnfold checkpoint or a state_dict \(found a list\)", id="list"),
    pytest.param("empty-state-dict", r"the state_dict is empty", id="empty-state-dict"),
    pytest.param("newer-format", r"format version 2 is newer than this bnfold supports \(1\)", id="newer-format"),
    pytest.param("no-arch", r"a bare state_dict does not say which architecture it belongs to; give --arch NAME "
                 r"\(mlp, cnn, resnet, mobilenet, conv1d\) or --model package\.module:factory", id="bare-no-arch"),
    pytest.param("unknown-arch", r"unknown architecture 'vgg16'; known: mlp, cnn, resnet, mobilenet, conv1d",
                 id="unknown-arch"),
    pytest.param("mismatch", r"state_dict does not match architecture 'cnn': 2 missing keys \(features\.0\.weight, "
                 r"features\.1\.weight\); 1 unexpected key \(extra\.weight\); 1 shape mismatch "
                 r"\(head\.2\.weight: file \(7, 4\) vs model \(4, 4\)\)", id="keys-and-shapes"),
    pytest.param("wrong-width", r"does not match architecture 'cnn': \d+ shape mismatches \(features\.0\.weight: "
                 r"file \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\), .*, \.\.\.\)", id="wrong-width"),
    pytest.param("bad-factory", r"cannot import 'no_such_pkg_xyz\.models' for model factory", id="bad-factory"),
    pytest.param("malformed-factory", r"model factory must look like 'package\.module:factory' or 'file\.py:factory', "
                 r"got 'just_a_name'",
                 id="malformed-factory"),
]


@pytest.mark.parametrize(("case", "pattern"), BAD)
def test_bad_checkpoint_is_one_line_bnfold_error(tmp_path: Path, case: str, pattern: str) -> None:
    path, kwargs = _bad(tmp_path, case)
    with pytest.raises(BnfoldError, match=pattern) as info:
        load_model(path, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        pytest.param("shapeless", r"the model has no input_shape attribute; give the shape of one sample with "
                     r"--input-shape C,H,W", id="no-input-shape"),
        pytest.param("not_a_model", r"returned a int, not a torch\.nn\.Module", id="not-a-module"),
        pytest.param("missing", r"has no callable 'missing'", id="no-such-factory"),
    ],
)
def test_bad_user_factory(tmp_path: Path, factory_module: str, factory: str, pattern: str) -> None:
    torch.save({"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}, tmp_path / "u.pt")
    with pytest.raises(BnfoldError, match=pattern):
        load_model(tmp_path / "u.pt", model_factory=f"{factory_module}:{factory}")


def test_save_into_missing_directory_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match=r"output directory .* does not exist"):
        _save(tmp_path / "no" / "m.pt", _model())
    assert list(tmp_path.iterdir()) == []


def test_metadata_is_stored_as_builtin_types(tmp_path: Path) -> None:
    import numpy as np

    save_checkpoint(tmp_path / "m.pt", _model(), arch="cnn", arch_config={"width": 4, "depth": 1},
                    input_shape=(1, 8, 8), class_labels=["a", "b", "c", "d"],
                    metrics={"best_val_accuracy": np.float32(0.75), "shape": (1, 2)})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["metrics"] == {"best_val_accuracy": 0.75, "shape": [1, 2]}
    assert type(raw["metrics"]["best_val_accuracy"]) is float
    with pytest.raises(TypeError, match=r"metadata metrics\.when has a object"):
        save_checkpoint(tmp_path / "n.pt", _model(), arch="cnn", arch_config={}, input_shape=(1, 8, 8),
                        class_labels=["a"], metrics={"when": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
