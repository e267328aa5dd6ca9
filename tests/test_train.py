"""Training: every architecture trains, round-trips through a checkpoint and folds to zero BN;
seeds reproduce; the best epoch is the one kept; bad options fail before anything is written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.checkpoint import load_model
from bnfold.errors import BnfoldError
from bnfold.layers import InputNorm
from bnfold.tolerance import Tolerance
from bnfold.train import TrainConfig, TrainResult, evaluate, train

SMALL: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("breast-cancer", {"width": 16}),
    "cnn": ("digits", {"width": 8, "depth": 1}),
    "resnet": ("digits", {"width": 8, "depth": 2}),
    "mobilenet": ("digits", {"width": 8, "depth": 2, "expansion": 2}),
    "conv1d": ("digits", {"width": 8, "depth": 2}),
}


def _small(arch: str, **overrides: Any) -> TrainConfig:
    dataset, config = SMALL[arch]
    base: dict[str, Any] = {"arch": arch, "dataset": dataset, "epochs": 2, "arch_config": config, "device": "cpu"}
    return TrainConfig(**{**base, **overrides})


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | InputNorm)]


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in SMALL])
def test_train_save_reload_and_fold_to_zero_bn(tmp_path: Path, arch: str) -> None:
    result = train(_small(arch), output=tmp_path / "m.pt")
    assert len(result.history) == 2 and result.checkpoint_sha256
    x = torch.from_numpy(result.dataset.X_val)  # raw values, as a client would send them

    loaded = load_model(tmp_path / "m.pt")
    with torch.no_grad():
        reference = result.model(x)
        torch.testing.assert_close(loaded.model(x), reference, rtol=0, atol=0)
    assert loaded.arch == arch and loaded.dataset == result.dataset.name
    assert loaded.input_shape == result.dataset.input_shape
    assert loaded.class_labels == result.dataset.class_labels
    assert loaded.meta["metrics"]["history"] == result.history

    n_norms = len(_norms(loaded.model))
    folded = bnfold.fold(loaded.model)
    assert folded.skipped == []
    assert len(folded.folded) == n_norms  # every BN and the InputNorm
    assert _norms(folded.model) == []
    with torch.no_grad():
        out = folded.model(x)
    comparison = Tolerance().compare(out.numpy(), reference.numpy())
    assert comparison.passed, comparison


@pytest.mark.parametrize("arch", [pytest.param("cnn", id="cnn"), pytest.param("mlp", id="mlp")])
def test_train_without_bn(arch: str) -> None:
    result = train(_small(arch, norm="none"))
    assert not [m for m in result.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert result.arch_config["norm"] == "none"
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


def test_input_norm_is_fitted_on_the_training_split() -> None:
    result = train(_small("cnn", epochs=1))
    x = result.dataset.X_train.astype(np.float64)
    norm = result.model.get_submodule("input_norm")
    np.testing.assert_allclose(norm.scale.numpy(), [1 / x.std()], rtol=1e-6)
    np.testing.assert_allclose(norm.shift.numpy(), [-x.mean() / x.std()], rtol=1e-6)


def test_same_seed_reproduces_weights_and_different_seed_does_not() -> None:
    a, b, c = (train(_small("cnn", epochs=1, seed=s)) for s in (5, 5, 6))
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=0, atol=0)
    assert a.history[0]["val_accuracy"] == b.history[0]["val_accuracy"]
    assert not torch.equal(a.model.state_dict()["head.2.weight"], c.model.state_dict()["head.2.weight"])


def test_best_epoch_is_the_one_kept(tmp_path: Path) -> None:
    result = train(_small("mlp", epochs=4, optimizer="sgd"), output=tmp_path / "m.pt")
    accs = [r["val_accuracy"] for r in result.history]
    assert result.best_val_accuracy == max(accs)
    assert accs[result.best_epoch - 1] == max(accs)
    x_val = torch.from_numpy(result.dataset.X_val)
    y_val = torch.from_numpy(result.dataset.y_val)
    loss, acc = evaluate(load_model(tmp_path / "m.pt").model, x_val, y_val)
    assert acc == result.best_val_accuracy
    assert loss == pytest.approx(result.history[result.best_epoch - 1]["val_loss"], rel=1e-5, abs=1e-6)


def test_cosine_schedule_decays_to_zero() -> None:
    result = train(_small("mlp", epochs=3, lr=0.01))
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] < 0.01 and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    train(_small("mlp", epochs=2), plot=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_user_data_trains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 4)) + y[:, None] * 3.0  # well separated
    np.savez(tmp_path / "d.npz", X=x.astype(np.float32), y=y)
    result = train(TrainConfig(arch="mlp", data=tmp_path / "d.npz", epochs=10, device="cpu"), output=tmp_path / "m.pt")
    assert result.dataset.name.endswith("d.npz") and result.best_val_accuracy == 1.0
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.meta["train_config"]["data"] == str(tmp_path / "d.npz")
    assert loaded.class_labels == ["0", "1", "2"] and loaded.input_shape == (4,)


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        pytest.param({"epochs": 0}, r"epochs must be a positive integer, got 0", id="zero-epochs"),
        pytest.param({"batch_size": -1}, r"batch_size must be a positive integer, got -1", id="bad-batch"),
        pytest.param({"lr": float("nan")}, r"lr must be a positive number, got nan", id="nan-lr"),
        pytest.param({"optimizer": "adam"}, r"optimizer must be one of adamw, sgd, got 'adam'", id="bad-optimizer"),
        pytest.param({"device": "cuda"}, r"device 'cuda' requested but no CUDA GPU", id="no-cuda"),
        pytest.param({"arch": "vgg"}, r"unknown architecture 'vgg'", id="unknown-arch"),
        pytest.param({"dataset": "mnist"}, r"unknown data set 'mnist'", id="unknown-dataset"),
        pytest.param({"data": "/nonexistent/x.npz"}, r"data path '/nonexistent/x\.npz' does not exist",
                     id="missing-data"),
        pytest.param({"arch_config": {"depth": 9}}, r"too small for depth=9", id="too-deep"),
    ],
)
def test_bad_options_fail_before_writing(tmp_path: Path, config: dict[str, Any], pattern: str) -> None:
    if config.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base: dict[str, Any] = {"arch": "cnn", "epochs": 1, "device": "cpu"}
    with pytest.raises(BnfoldError, match=pattern):
        train(TrainConfig(**{**base, **config}), output=tmp_path / "m.pt", plot=tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_path_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(BnfoldError, match=r"checkpoint directory '.*missing' does not exist"):
        train(_small("mlp"), output=tmp_path / "missing" / "m.pt")
    with pytest.raises(BnfoldError, match=r"plot '.*' is a directory, expected a file name"):
        train(_small("mlp"), plot=tmp_path)
    with pytest.raises(BnfoldError, match=r"plot directory '.*missing' does not exist"):
        train(_small("mlp"), output=tmp_path / "m.pt", plot=tmp_path / "missing" / "c.png")
    with pytest.raises(BnfoldError, match=r"the checkpoint and the plot are the same file"):
        train(_small("mlp"), output=tmp_path / "m.pt", plot=tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []  # not even the checkpoint that could have been written


def test_the_plot_marks_the_saved_epoch_on_both_panels() -> None:
    from bnfold.train import figure

    history = [{"epoch": float(e), "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 20,
                "val_accuracy": acc} for e, acc in enumerate([0.5, 0.7, 0.9, 0.8], start=1)]
    fig = figure(history, best_epoch=3)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation", "saved: epoch 3"]
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [3]
    (star,) = [line for line in fig.axes[1].get_lines() if line.get_marker() == "*"]
    assert list(star.get_ydata()) == [0.9]


def test_interrupt_keeps_the_best_epoch_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.train as train_module

    real, calls = train_module.evaluate, []

    def evaluate_then_interrupt(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third epoch's validation
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_interrupt)
    result = train(_small("mlp", epochs=10), output=tmp_path / "m.pt", plot=tmp_path / "c.png")
    assert result.interrupted and len(result.history) == 2 and result.epochs == 10
    assert result.best_epoch in (1, 2)
    meta = load_model(tmp_path / "m.pt").meta["metrics"]
    assert meta["interrupted"] is True and meta["epochs_planned"] == 10 and len(meta["history"]) == 2
    assert (tmp_path / "c.png").is_file()


def test_interrupt_in_the_first_epoch_saves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.train as train_module

    def interrupt(*args: object, **kwargs: object) -> tuple[float, float]:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_small("mlp"), output=tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_rgb_image_folder_trains_and_folds(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 80, size=(10, 10, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels, "RGB").save(tmp_path / "imgs" / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    result = train(TrainConfig(arch="resnet", data=tmp_path / "imgs", image_size=8, epochs=3, batch_size=4,
                               arch_config={"width": 4, "depth": 2}, device="cpu"))
    assert result.dataset.input_shape == (3, 8, 8) and result.dataset.class_labels == ["blue", "red"]
    # regression: the images were stacked channels-last in memory, which crashed torch's training kernels
    assert result.dataset.X_train.flags.c_contiguous and result.dataset.X_val.flags.c_contiguous
    assert len(result.input_norm["mean"]) == 3
    folded = bnfold.fold(result.model)
    assert folded.skipped == [] and _norms(folded.model) == []
    x = torch.from_numpy(np.concatenate([result.dataset.X_train, result.dataset.X_val]))
    with torch.no_grad():
        comparison = Tolerance().compare(folded.model(x).numpy(), result.model(x).numpy())
    assert comparison.passed, comparison


@pytest.mark.slow
def test_default_run_reaches_095_on_digits() -> None:
    result: TrainResult = train(TrainConfig(device="cpu"))
    assert result.arch == "cnn" and result.dataset.name == "digits"
    assert result.best_val_accuracy >= 0.95
