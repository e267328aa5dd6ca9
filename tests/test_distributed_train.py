"""Training state in checkpoints (``resume``), and the options of data-parallel and CUDA training
that can be checked in one CPU process. The two-process runs are in tests/cli/test_train_distributed_cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bnfold.checkpoint import read_checkpoint, save_checkpoint
from bnfold.errors import BnfoldError
from bnfold.train import TrainConfig, train


def _config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {"arch": "mlp", "dataset": "breast-cancer", "epochs": 4, "arch_config": {"width": 16},
                            "device": "cpu", "seed": 3}
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def straight() -> list[dict[str, float]]:
    """The history of 4 epochs trained in one go."""
    return train(_config()).history


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of the same run stopped by Ctrl-C during epoch 3 (it keeps epoch 2)."""
    import bnfold.train as train_module

    real, calls = train_module.evaluate, []

    def evaluate_then_interrupt(*args: Any, **kwargs: Any) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    path = tmp_path_factory.mktemp("resume") / "stopped.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", evaluate_then_interrupt)
        result = train(_config(), output=path)
    assert result.interrupted and result.best_epoch == 2, result.history  # the premise of the tests below
    return path


def test_the_checkpoint_holds_the_saved_epochs_training_state(interrupted: Path) -> None:
    resume = read_checkpoint(interrupted)["resume"]
    assert resume["epoch"] == 2 and isinstance(resume["rng"], torch.Tensor) and resume["scaler"] is None
    steps = resume["scheduler"]["last_epoch"]
    assert steps == 2 * 15  # 2 epochs of ceil(455 / 32) steps (mlp batch 32), as the schedule counted them
    assert {int(s["step"]) for s in resume["optimizer"]["state"].values()} == {steps}  # AdamW's step count


def test_resume_continues_as_if_never_stopped(interrupted: Path, straight: list[dict[str, float]]) -> None:
    resumed = train(_config(resume=interrupted))
    assert [int(r["epoch"]) for r in resumed.history] == [1, 2, 3, 4]
    for mine, theirs in zip(resumed.history, straight, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            # weights, AdamW moments, schedule and batch order restored: the same float operations
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (key, mine, theirs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"arch_config": {"width": 8}}, "arch_config {'width': 16, ", id="other-width"),
        pytest.param({"optimizer": "sgd"}, "optimizer 'adamw' there, 'sgd' here", id="other-optimizer"),
        pytest.param({"seed": 4}, "seed 3 there, 4 here", id="other-split"),
        pytest.param({"epochs": 2}, "already holds epoch 2; give --epochs above 2", id="no-epochs-left"),
    ],
)
def test_resume_refuses_a_run_with_other_settings(interrupted: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BnfoldError, match=message.replace("(", r"\(").replace("{", r"\{")):
        train(_config(resume=interrupted, **overrides))


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path: Path) -> None:
    result = train(_config(epochs=1))
    path = tmp_path / "plain.pt"
    save_checkpoint(path, result.model, arch="mlp", arch_config=result.arch_config,
                    input_shape=result.dataset.input_shape, class_labels=result.dataset.class_labels,
                    dataset=result.dataset.name, train_config={"seed": 3})
    with pytest.raises(BnfoldError, match="holds no training state"):
        train(_config(resume=path), output=tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt"]


def test_amp_needs_cuda() -> None:
    with pytest.raises(BnfoldError, match="--amp \\(mixed precision\\) needs --device cuda; this run trains on cpu"):
        train(_config(amp=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(BnfoldError, match="device 'cuda' requested but no CUDA GPU is available"):
        train(_config(device="cuda"))


def test_one_process_run_reports_world_size_one(tmp_path: Path) -> None:
    result = train(_config(epochs=1), output=tmp_path / "m.pt")
    assert (result.world_size, result.backend, result.sync_bn, result.rank) == (1, "", False, 0)
    metrics = read_checkpoint(tmp_path / "m.pt")["metrics"]
    assert (metrics["world_size"], metrics["sync_bn"]) == (1, False)
