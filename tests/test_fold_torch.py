"""fold_torch: equivalence for every foldable pattern, one negative test per refusal reason."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import BnfoldError
from bnfold.fold_torch import fold_torch
from bnfold.fold_torch.guard import RankDispatch
from bnfold.layers import InputNorm

torch.manual_seed(0)
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def x_of(dims: int, c: int, size: int = 7, n: int = 2) -> torch.Tensor:
    return torch.randn((n, c) + (size,) * dims)


class Residual(nn.Module):
    """conv-bn-relu-conv-bn + identity shortcut, then a branch joined by torch.cat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.side, self.bs = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x
        return torch.cat([F.relu(y), self.bs(self.side(x))], dim=1)


class Functional(nn.Module):
    """F.batch_norm with registered buffers/parameters and training=self.training."""

    def __init__(self, torch_op: bool = False) -> None:
        super().__init__()
        self.torch_op = torch_op
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("rm", torch.randn(5))
        self.register_buffer("rv", torch.rand(5) + 0.5)
        self.w = nn.Parameter(torch.randn(5))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.torch_op:
            return torch.batch_norm(y, self.w, self.b, self.rm, self.rv, False, 0.1, 1e-3, False)
        return F.batch_norm(y, self.rm, self.rv, self.w, self.b, self.training, 0.1, 1e-3)


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.dropout(self.fc(x), 0.3, self.training))


class SharedConv(nn.Module):
    """The same conv module called twice, each call followed by its own BN, plus a bare third call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.b1, self.b2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.conv(self.b1(self.conv(x)))) + self.conv(x)


class Tied(nn.Module):
    """Two convs sharing one weight Parameter; only the first is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


class ReadsWeight(nn.Module):
    """Uses fc.weight directly elsewhere (tied-embedding style): the fold must go into a private copy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) + x @ self.fc.weight


class BufferWeight(nn.Module):
    """A Linear whose weight is a buffer, not a Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
        w = self.fc.weight.detach().clone()
        del self.fc.weight
        self.fc.register_buffer("weight", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class MyBN(nn.BatchNorm2d):
    """A subclass keeping the torch forward: folds like BatchNorm2d."""


class MyConv(nn.Conv2d):
    pass


class OwnForwardBN(nn.BatchNorm2d):
    """Overrides forward: traced through, its F.batch_norm is matched and reported under the module's name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            0.1, self.eps)


class ViewHead(nn.Module):
    """No natural input (the input is scaled first); the rank comes from the graph: ``view(n, -1)`` is 2-D,
    ``view(n, 4, -1)`` is 3-D (then the Linear's features are not the axis BatchNorm1d normalizes)."""

    def __init__(self, seq: bool = False) -> None:
        super().__init__()
        self.seq = seq
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc, self.bn = (nn.Linear(25, 4), nn.BatchNorm1d(4)) if seq else (nn.Linear(100, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x / 255)
        y = y.view(y.size(0), 4, -1) if self.seq else y.view(y.size(0), -1)
        return self.bn(self.fc(y))


def with_input_shape(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    model.input_shape = shape  # type: ignore[assignment]
    return model


def zero_shift_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(c) + 0.5)
        bn.weight.copy_(torch.rand(c) + 0.5)
    bn.keep_stats = True  # mean 0 and beta 0 -> shift 0: the randomizer leaves it alone
    return bn


FOLDS = [
    # (builder, input, folded, left, fold options)
    *[pytest.param(lambda d=d: nn.Sequential(CONV[d](4, 6, 3, stride=2, dilation=1, padding=1), BN[d](6)),
                   x_of(d, 4), 1, 0, {}, id=f"conv{d}d-bn") for d in (1, 2, 3)],
    pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, dilation=2, bias=False), nn.BatchNorm2d(6)),
                 x_of(2, 4, 9), 1, 0, {}, id="conv-dilation-no-bias"),
    *[pytest.param(lambda mode=mode: nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, padding_mode=mode), nn.BatchNorm2d(6)),
                   x_of(2, 4), 1, 0, {}, id=f"conv-padding-{mode}") for mode in ("zeros", "reflect", "replicate",
                                                                                 "circular")],
    pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding="same"), nn.BatchNorm2d(6)),
                 x_of(2, 4), 1, 0, {}, id="conv-padding-same"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), x_of(2, 4), 1, 0, {},
                 id="conv-grouped"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8)), x_of(2, 4), 1, 0, {},
                 id="conv-depthwise-multiplier"),
    *[pytest.param(lambda d=d: nn.Sequential(CONVT[d](4, 6, 3, stride=2, output_padding=1, groups=2), BN[d](6)),
                   x_of(d, 4, 4), 1, 0, {}, id=f"convtranspose{d}d-groups-bn") for d in (1, 2, 3)],
    pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4)),
                 x_of(2, 4), 1, 0, {}, id="convtranspose-depthwise"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), torch.randn(4, 6), 1, 0, {},
                 id="linear-bn1d"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5, affine=False, eps=0.3,
                                                                                  momentum=None)),
                 torch.randn(4, 6), 1, 0, {}, id="linear-bn-affine-false-eps-momentum-none"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), x_of(1, 3), 1, 0, {},
                 id="conv1d-bn1d-natural-input"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), torch.randn(4, 6), 1, 0, {},
                 id="bn-before-linear"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)), x_of(2, 4), 1, 0, {},
                 id="bn-before-conv-no-padding"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect",
                                                                    groups=4)),
                 x_of(2, 4), 1, 0, {}, id="bn-before-depthwise-conv-reflect"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm3d(2), nn.Conv3d(2, 3, 2, padding=1, padding_mode="circular")),
                 x_of(3, 2, 4), 1, 0, {}, id="bn-before-conv3d-circular"),
    pytest.param(lambda: nn.Sequential(zero_shift_bn(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)),
                 x_of(2, 4), 1, 0, {}, id="bn-zero-shift-before-convtranspose"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Identity(), nn.BatchNorm2d(4)),
                 x_of(2, 3), 1, 0, {}, id="conv-dropout-identity-bn"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3)), torch.randn(4, 6),
                 1, 0, {}, id="bn-dropout-linear"),
    pytest.param(FunctionalDropout, torch.randn(4, 6), 1, 0, {}, id="functional-dropout-eval"),
    pytest.param(Functional, x_of(2, 3), 1, 0, {}, id="F.batch_norm-buffers"),
    pytest.param(lambda: Functional(torch_op=True), x_of(2, 3), 1, 0, {}, id="torch.batch_norm-buffers"),
    pytest.param(Residual, x_of(2, 4), 3, 0, {}, id="residual-add-and-cat"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)), x_of(2, 3),
                 2, 0, {}, id="conv-bn-bn-chain"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 2)), torch.randn(3, 6),
                 2, 0, {}, id="bn-bn-linear-chain"),
    pytest.param(lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.BatchNorm1d(5),
                                       nn.Linear(5, 2)),
                 torch.randn(3, 6), 2, 0, {}, id="bn-on-both-sides-of-relu"),
    pytest.param(lambda: nn.Sequential(InputNorm(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x_of(2, 3), 2, 0, {},
                 id="inputnorm-conv-no-padding"),
    pytest.param(lambda: with_input_shape(nn.Sequential(InputNorm(5), nn.Linear(5, 2)), (5,)), torch.randn(3, 5),
                 1, 0, {}, id="inputnorm-linear-input_shape"),
    pytest.param(SharedConv, x_of(2, 3), 2, 0, {}, id="conv-called-three-times-private-copies"),
    pytest.param(Tied, x_of(2, 3), 1, 0, {}, id="tied-weight-private-copy"),
    pytest.param(ReadsWeight, torch.randn(4, 5), 1, 0, {"example_inputs": torch.randn(4, 5)},
                 id="weight-read-elsewhere-private-copy"),
    pytest.param(BufferWeight, torch.randn(4, 4), 1, 0, {}, id="weight-is-a-buffer"),
    pytest.param(lambda: nn.Sequential(MyConv(3, 4, 3), MyBN(4)), x_of(2, 3), 1, 0, {}, id="subclasses"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), OwnForwardBN(4)), x_of(2, 3), 1, 0, {},
                 id="bn-subclass-with-own-forward"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), x_of(2, 3), 1, 0, {},
                 id="syncbatchnorm-eval"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), x_of(1, 3), 1, 0,
                 {"example_inputs": x_of(1, 3)}, id="conv1d-bn1d-example-inputs"),
    pytest.param(lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.BatchNorm1d(5)), torch.randn(2, 3, 4, 4),
                 1, 0, {}, id="flatten-linear-bn1d-rank-from-graph"),
    pytest.param(ViewHead, x_of(2, 3), 1, 0, {}, id="view-linear-bn1d-rank-from-graph"),
    pytest.param(lambda: nn.Sequential(nn.Linear(0, 3), nn.BatchNorm1d(3)), torch.randn(2, 0), 1, 0, {},
                 id="zero-size-weight", marks=pytest.mark.filterwarnings("ignore:Initializing zero-element")),
]


@pytest.mark.parametrize(("build", "x", "folded", "left", "options"), FOLDS)
def test_folds_exactly(build: Callable[[], nn.Module], x: torch.Tensor, folded: int, left: int, options: dict,
                       fold_check, randomize) -> None:
    model = randomize(build()).eval()
    fold_check(model, x, folded=folded, left=left, **options)


def test_train_mode_model_is_folded_with_running_stats_and_noted(fold_check, randomize) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))).train()
    result = fold_check(model, x_of(2, 3), folded=1, left=0)
    assert model.training  # the input keeps its mode
    assert any("train mode" in n for n in result.notes)


def test_public_entry_point_and_result_shape(randomize) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    result = bnfold.fold(model)
    assert [(f.bn, f.into, f.side) for f in result.folded] == [("1", "0", "output")]
    assert [s.bn for s in result.skipped] == ["3"]
    assert "2 (ReLU) is not a Conv/ConvTranspose/Linear module" in result.skipped[0].reason
    assert isinstance(result.model, nn.Module) and not result.model.training
    assert result.counts == {"folded": 1, "kept": 1}


def test_private_copy_is_named_and_noted(randomize) -> None:
    result = fold_torch(randomize(SharedConv()).eval())
    assert {f.into for f in result.folded} == {"conv_folded", "conv_folded_1"}
    assert any("private copy" in n for n in result.notes)


def test_folded_layer_gets_a_bias_and_keeps_parameter_kind(randomize) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).eval()
    folded = fold_torch(model).model
    conv = folded.get_submodule("0")
    assert isinstance(conv.weight, nn.Parameter) and isinstance(conv.bias, nn.Parameter)
    assert model[0].bias is None


def test_input_shape_attribute_is_kept(randomize) -> None:
    model = with_input_shape(randomize(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval(), (4,))
    assert fold_torch(model).model.input_shape == (4,)


def test_extreme_statistics_match_float64(fold_check) -> None:
    """Tiny variances and large gamma: the folded float32 model is as close to float64 as the original."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, eps=1e-5))
    with torch.no_grad():
        bn = model[1]
        bn.running_var.copy_(torch.tensor([1e-8, 1e-6, 1e-4, 1.0, 1e3, 1e-7]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 5.0, -40.0, 0.0]))
        bn.weight.copy_(torch.tensor([50.0, -100.0, 1e3, 1e-3, 7.0, 1.0]))
        bn.bias.copy_(torch.tensor([1.0, -2.0, 3.0, 4.0, -5.0, 6.0]))
    fold_check(model.eval(), x_of(2, 3), folded=1, left=0)


# ---------------------------------------------------------------- refusals: the BN stays, with a reason


class OutputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(self.bn(y)) + y


class OutputIsReturned(OutputUsedTwice):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        y = self.conv(x)
        return F.relu(self.bn(y)), y


class ComputedGamma(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.rm, self.rv, self.w * 2, self.b, False, 0.1, 1e-3)


class AlwaysTraining(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(F.relu(self.conv(x)), self.rm, self.rv, self.w, self.b, True, 0.1, 1e-3)


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


class Untraceable(nn.Module):
    """Data-dependent control flow at the root; the blocks themselves trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.reach = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:  # not traceable
            y = -y
        return self.bn(self.reach(y)) + self.reach[0](y)  # reaches into self.reach


class ThreeD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2))  # foldable in principle, but bnfold only looks through identities


def hooked() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    m[0].register_forward_hook(lambda mod, inp, out: out)
    return m


def bn_hooked() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    m[1].register_forward_pre_hook(lambda mod, inp: None)
    return m


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.spare = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


REFUSALS = [
    # (builder, input, fold options, reason fragment)
    pytest.param(OutputUsedTwice, x_of(2, 3), {}, "is also used by add", id="output-has-another-consumer"),
    pytest.param(OutputIsReturned, x_of(2, 3), {}, "is also used by the model output", id="output-is-graph-output"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), x_of(2, 3), {},
                 "1 (ReLU) is not a Conv/ConvTranspose/Linear module", id="relu-between"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
                 x_of(2, 3), {}, "no population statistics", id="track-running-stats-false"),
    pytest.param(ComputedGamma, x_of(2, 3), {}, "computed at run time", id="computed-bn-weight"),
    pytest.param(AlwaysTraining, x_of(2, 3), {}, "training=True", id="functional-training-true"),
    pytest.param(lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(3)), torch.randn(2, 3, 5), {"example_inputs":
                 torch.randn(2, 3, 5)}, "num_features=3 but 0.out_features=4", id="num-features-mismatch"),
    pytest.param(lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), torch.randn(2, 4, 5),
                 {"example_inputs": torch.randn(2, 4, 5)}, "same axis only for 2-D", id="linear-3d-axis-mismatch"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), torch.randn(3, 4),
                 {"example_inputs": torch.randn(3, 4)}, "unbatched", id="conv1d-unbatched-axis-mismatch"),
    pytest.param(lambda: ViewHead(seq=True), x_of(2, 3), {}, "same axis only for 2-D",
                 id="linear-3d-axis-mismatch-rank-from-graph"),
    pytest.param(ThreeD, torch.randn(2, 3, 5), {}, "transpose", id="non-identity-op-between"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), x_of(2, 3), {},
                 "zero padding (1, 1)", id="bn-before-zero-padded-conv"),
    pytest.param(lambda: nn.Sequential(InputNorm(3), nn.Conv2d(3, 4, 3, padding=1)), x_of(2, 3), {},
                 "zero padding (1, 1)", id="inputnorm-before-zero-padded-conv"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2)), torch.randn(2, 5, 5),
                 {"example_inputs": torch.randn(2, 5, 5)}, "same axis only for 2-D", id="bn-before-linear-3d"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), x_of(2, 3), {},
                 "transposed convolution is not exact", id="bn-before-convtranspose"),
    pytest.param(hooked, torch.randn(2, 4), {}, "forward hooks", id="layer-has-hooks"),
    pytest.param(bn_hooked, torch.randn(2, 4), {}, "1 has forward hooks", id="bn-has-hooks"),
]


@pytest.mark.parametrize(("build", "x", "options", "reason"), REFUSALS)
def test_refuses_with_reason(build: Callable[[], nn.Module], x: torch.Tensor, options: dict, reason: str,
                             fold_check, randomize) -> None:
    model = randomize(build()).eval()
    n_norms = sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, InputNorm)) for m in model.modules()) or 1
    result = fold_check(model, x, folded=0, left=n_norms, **options)
    assert result.skipped and any(reason in s.reason for s in result.skipped), result.skipped


def _rank_checks(model: nn.Module) -> int:
    return sum(isinstance(m, RankDispatch) for m in model.modules())


def test_rank_unknown_folds_with_a_run_time_rank_dispatch(fold_check, randomize) -> None:
    class Scaled(nn.Module):  # the input is scaled first: no natural input shape can be inferred
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x * 2))

    model = randomize(Scaled()).eval()
    result = fold_check(model, torch.randn(3, 5), folded=1, left=0)
    assert _rank_checks(result.model) == 1
    assert any("for 2-D input" in n and "original Linear and batch norm" in n and "example_inputs" in n
               for n in result.notes), result.notes
    fold_check(model, torch.randn(3, 4, 5), folded=1, left=0)  # 3-D: the original's outputs, no error
    given = fold_check(model, torch.randn(3, 5), folded=1, left=0, example_inputs=torch.randn(3, 5))
    assert _rank_checks(given.model) == 0


@pytest.mark.parametrize("build", [
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), id="linear-bn1d"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4)), id="bn1d-linear"),
])
def test_guessed_2d_fold_never_computes_a_wrong_3d_result(build, fold_check, randomize) -> None:
    """Regression: with no example_inputs the input rank of a Linear-first model was guessed as 2-D and
    the fold silently changed the result for (N, L, C) input with L == num_features (axis mismatch)."""
    model = randomize(build()).eval()
    x3 = torch.randn(3, 4, 4)
    result = fold_check(model, torch.randn(3, 4), folded=1, left=0)
    assert _rank_checks(result.model) == 1
    fold_check(model, x3, folded=1, left=0)  # the same fold run on 3-D input: the original's outputs
    refused = fold_check(model, x3, folded=0, left=1, example_inputs=x3)
    assert "only for 2-D tensors" in refused.skipped[0].reason


def test_rank_checks_do_not_block_chains_or_second_inputs(fold_check, randomize) -> None:
    class TwoInputs(nn.Module):  # two graph inputs: no natural input shape; the second one is pre-scaled
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Linear(6, 4), nn.BatchNorm1d(4)
            self.pre, self.pre2, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn_a(self.a(x)) + self.b(self.pre2(self.pre(y / 2)))

    model = randomize(TwoInputs()).eval()
    result = fold_check(model, (torch.randn(5, 6), torch.randn(5, 3)), folded=3, left=0)
    assert _rank_checks(result.model) == 2
    fold_check(model, (torch.randn(3, 6), torch.randn(5, 3, 3)), folded=3, left=0)  # chain at 3-D


def test_untraceable_model_folds_inside_safe_children(fold_check, randomize) -> None:
    model = randomize(Untraceable()).eval()
    x = x_of(2, 3)
    result = fold_check(model, x, folded=1, left=2, example_inputs=x)
    assert [f.bn for f in result.folded] == ["block.1"]
    reasons = {s.bn: s.reason for s in result.skipped}
    assert "cannot trace" in reasons["bn"]
    assert "may reach into reach" in reasons["reach.1"]
    assert any("cannot be traced" in n for n in result.notes)


def test_unused_bn_is_reported_once(fold_check, randomize) -> None:
    result = fold_check(randomize(Unused()).eval(), torch.randn(3, 4), folded=1, left=0)
    assert [(s.bn, "not called" in s.reason) for s in result.skipped] == [("spare", True)]


def test_uninitialized_lazy_module_raises() -> None:
    with pytest.raises(BnfoldError, match=r"uninitialized lazy modules \(0\); run one forward pass"):
        fold_torch(nn.Sequential(nn.LazyLinear(3), nn.BatchNorm1d(3)))


class UntraceableShared(nn.Module):
    """The same block object under two names: folding inside it could change the other use."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else -self.b(x)


def test_untraceable_model_refuses_shared_children(fold_check, randomize) -> None:
    result = fold_check(randomize(UntraceableShared()).eval(), x_of(2, 3), folded=0, left=1)
    assert [s.bn for s in result.skipped] == ["a.1"]
    assert "reachable by more than one path" in result.skipped[0].reason


def test_bad_example_inputs_raise() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    with pytest.raises(BnfoldError, match=r"shapes \[\(2, 5\)\] do not run through the model"):
        fold_torch(model, example_inputs=torch.randn(2, 5))
    with pytest.raises(TypeError, match="got list"):
        fold_torch(model, example_inputs=[[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got str"):
        bnfold.fold("model.pt")


def test_bn_whose_weight_forward_still_reads_leaves_no_batch_norm_module(fold_check, randomize) -> None:
    """Regression: the folded BN stayed in the result as a BatchNorm2d (never called) because forward reads
    ``bn.weight``; now only its tensors are kept, in a plain module."""

    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)

    result = fold_check(randomize(ReadsWeight()).eval(), x_of(2, 3), folded=1, left=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    assert set(dict(result.model.bn.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}


def test_bn_inside_scripted_submodule_is_reported_kept(fold_check, randomize) -> None:
    """Regression: a BN inside a torch.jit.script-ed submodule was in neither folded nor skipped."""

    class WithScripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = torch.jit.script(randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval())
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.pre(x)))

    result = fold_check(randomize(WithScripted()).eval(), x_of(2, 3), folded=1, left=0)
    assert [(s.bn, "torch.jit.script" in s.reason) for s in result.skipped] == [("pre.1", True)]


def test_scripted_model_is_a_clear_error(randomize) -> None:
    scripted = torch.jit.script(randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval())
    with pytest.raises(BnfoldError, match="TorchScript module"):
        fold_torch(scripted)


def test_layers_called_with_input_keyword_fold_with_rank_dispatch(fold_check, randomize) -> None:
    """Regression: the run-time rank check read the layer's input from its positional arguments only,
    so ``self.fc(input=x)`` crashed the fold (IndexError). The rank dispatch takes ``input=`` too."""

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(input=self.bn(input=self.fc(input=x * 2)))

    model = randomize(Keywords()).eval()
    result = fold_check(model, torch.randn(3, 5), folded=1, left=0)
    assert _rank_checks(result.model) == 1
    fold_check(model, torch.randn(3, 4, 5), folded=1, left=0)


@pytest.mark.parametrize("mean, var, gamma", [
    pytest.param(0.0, 1e-12, 1.0, id="var-1e-12"),
    pytest.param(0.0, 1e-12, 1e4, id="var-1e-12-gamma-1e4"),
    pytest.param(1e6, 1.0, 1.0, id="mean-1e6"),
    pytest.param(-1e5, 1e3, 1e4, id="mean-1e5-gamma-1e4"),
])
@pytest.mark.parametrize("build, x", [
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), x_of(2, 3), id="conv-bn"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3)), x_of(2, 3), id="bn-conv"),
    pytest.param(lambda: nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 6)), torch.randn(4, 8), id="bn-linear"),
    pytest.param(lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6)), x_of(2, 3),
                 id="convtranspose-bn"),
])
def test_brief_extreme_statistics_match_float64(build, x, mean: float, var: float, gamma: float, fold_check) -> None:
    """Folded float32 within Tolerance of the float64 original for eps=1e-5 and extreme running statistics."""
    torch.manual_seed(1)
    model = build()
    bn = next(m for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(mean * (1 + 0.1 * torch.randn(n)))
        bn.running_var.copy_(var * (torch.rand(n) + 0.5))
        bn.weight.copy_(gamma * torch.randn(n))
        bn.bias.copy_(torch.randn(n))
    fold_check(model.eval(), x, folded=1, left=0, example_inputs=x)


@pytest.mark.parametrize("wrap, attr", [
    pytest.param(torch.compile, "_orig_mod", id="torch.compile"),
    pytest.param(nn.DataParallel, "module", id="DataParallel-cpu"),
])
def test_wrapped_model_folds_its_inner_module(wrap, attr: str, fold_check, randomize) -> None:
    """Regression: fold(torch.compile(model)) returned the compiled wrapper, whose compiled forward kept
    running the original, unfolded inner module (error 15 on the probe model); DataParallel was refused."""
    inner = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                    nn.BatchNorm2d(4))).eval()
    wrapped = wrap(inner)
    result = fold_torch(wrapped)
    assert sorted(f.bn for f in result.folded) == [f"{attr}.1", f"{attr}.4"] and not result.skipped
    assert not isinstance(result.model, type(wrapped)) and "unwrapped" in result.notes[0]
    x = x_of(2, 3)
    with torch.no_grad():
        cmp = bnfold.Tolerance().compare(result.model(x), inner(x))
    assert cmp.passed, cmp


def test_untraceable_instance_forward_is_not_folded_behind_its_back(randomize) -> None:
    """Regression: a forward replaced on the instance (closure over the child) kept calling the old child
    after the fallback swapped in a folded copy, so a BN was reported folded but still ran."""

    class Patched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            block = self.block

            def forward(x: torch.Tensor) -> torch.Tensor:
                return x if x.sum() > 1e9 else block(x)  # data-dependent: torch.fx cannot trace it

            self.forward = forward

    model = randomize(Patched()).eval()
    result = fold_torch(model)  # fold_check's float64 copy would share the closure's float32 block
    assert not result.folded and "forward replaced on the instance" in result.skipped[0].reason
    x = x_of(2, 3)
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))


def test_optional_none_argument_keeps_default_call_working(fold_check, randomize) -> None:
    """Regression: ``forward(x, mask=None)`` traced ``mask`` as a tensor, so ``if mask is not None`` was
    always taken and the folded model crashed when called as ``model(x)`` (TypeError: Tensor * None)."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            y = self.bn(self.conv(x))
            if mask is not None:
                y = y * mask
            return y

    model = randomize(Masked()).eval()
    result = fold_check(model, x_of(2, 3), folded=1, left=0)
    with pytest.raises(AssertionError, match="specialized to have value None"):
        result.model(x_of(2, 3), mask=torch.ones(1))  # never silently ignored
    x, mask = x_of(2, 3), torch.rand(1, 4, 1, 1)  # a mask given in example_inputs stays an input
    fold_check(model, (x, mask), folded=1, left=0, example_inputs=(x, mask))


def test_model_that_is_a_batch_norm_is_reported(randomize) -> None:
    """Regression: fold(nn.BatchNorm2d(3)) returned 0 folded and 0 kept (the BN was in neither list)."""
    result = fold_torch(randomize(nn.Sequential(nn.BatchNorm2d(3)))[0].eval())
    assert result.folded == [] and [s.bn for s in result.skipped] == [""]
    assert "no layer next to it" in result.skipped[0].reason
