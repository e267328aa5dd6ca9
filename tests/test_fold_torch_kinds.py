"""fold_torch.kinds: every batch-norm kind folds exactly; look-alikes that compute something else do not.

The modules here are written inline after the structure of the libraries people use (timm's
``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d``, torchvision's
``FrozenBatchNorm2d``), so the tests need neither library.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.fold_torch import fold_torch
from bnfold.fold_torch.kinds import PostOp, recognize

torch.manual_seed(0)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layout: a BatchNorm2d subclass with its own forward (rank assert, F.batch_norm, drop, act)."""

    def __init__(self, c: int, act: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                         0.1, self.eps)
        return self.act(self.drop(x))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: torch's forward via super(), then drop and act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class CheckedBN(nn.BatchNorm2d):
    """A plain subclass whose forward only checks the rank, then normalizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "expected 4-D input")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's layout: statistics and affine parameters as buffers, computed with rsqrt."""

    def __init__(self, c: int, eps: float = 1e-5, act: nn.Module | None = None) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(c)), ("bias", torch.zeros(c)), ("running_mean", torch.zeros(c)),
                            ("running_var", torch.ones(c))):
            self.register_buffer(name, value)
        if act is not None:
            self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        y = x * scale + bias
        return self.act(y) if hasattr(self, "act") else y


class NotABatchNorm(FrozenBatchNorm2d):
    """The frozen layout, but the forward ignores the statistics: not a batch norm, must not be folded as one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class ConvNorm(nn.Module):
    """conv -> norm -> conv -> norm, the second conv reading the shape of the first norm's input."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), norm(6)
        self.c2, self.n2 = nn.Conv2d(6, 4, 3, stride=2), norm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        torch._assert(y.shape[1] == 6, "channels")  # a metadata read of the conv output: not a use
        return self.n2(self.c2(self.n1(y))).flatten(1) * y.size(0)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 9, 9)


@pytest.mark.parametrize("norm", [
    pytest.param(lambda c: BatchNormAct2d(c), id="timm-batchnorm-act-silu"),
    pytest.param(lambda c: BatchNormAct2d(c, act=nn.PReLU(c), drop=nn.Dropout(0.2)), id="timm-bn-act-prelu-drop"),
    pytest.param(lambda c: BatchNormAct2d(c, act=nn.Identity()), id="timm-bn-act-identity"),
    pytest.param(CheckedBN, id="subclass-asserting-rank"),
    pytest.param(FrozenBatchNorm2d, id="torchvision-frozen"),
    pytest.param(lambda c: FrozenBatchNorm2d(c, eps=1e-3, act=nn.ReLU()), id="timm-frozen-act"),
    pytest.param(nn.SyncBatchNorm, id="sync-batchnorm"),
])
def test_every_kind_folds_into_the_conv_before_it(norm: Callable[[int], nn.Module], fold_check, randomize) -> None:
    model = randomize(ConvNorm(norm)).eval()
    result = fold_check(model, _x(), folded=2, left=0, example_inputs=_x())
    assert {(f.bn, f.into) for f in result.folded} == {("n1", "c1"), ("n2", "c2")}


def test_sync_batchnorm_act_keeps_its_act(fold_check, randomize) -> None:
    def norm(c: int) -> nn.Module:
        bn = SyncBatchNormAct(c)
        bn.drop, bn.act = nn.Identity(), nn.Hardswish()
        return bn

    result = fold_check(randomize(ConvNorm(norm)).eval(), _x(), folded=2, left=0)
    assert isinstance(result.model.get_submodule("n1"), PostOp)
    assert isinstance(result.model.get_submodule("n1.act"), nn.Hardswish)


def test_folded_bn_act_is_replaced_by_its_post_op_keeping_names(fold_check, randomize) -> None:
    model = randomize(ConvNorm(lambda c: BatchNormAct2d(c, act=nn.PReLU(c), drop=nn.Dropout(0.2)))).eval()
    with torch.no_grad():
        model.n1.act.weight.uniform_(0.1, 0.4)  # a post-op with parameters of its own
    result = fold_check(model, _x(), folded=2, left=0)
    post = result.model.get_submodule("n1")
    assert isinstance(post, PostOp) and list(post._modules) == ["act"]  # eval-mode dropout is the identity
    state = result.model.state_dict()
    assert torch.equal(state["n1.act.weight"], model.n1.act.weight)
    assert not any(k.startswith("n1.running") or k in ("n1.weight", "n1.bias") for k in state)


def test_bn_act_does_not_fold_into_the_layer_after_it(randomize) -> None:
    model = randomize(nn.Sequential(BatchNormAct2d(3, act=nn.ReLU()), nn.Conv2d(3, 4, 1))).eval()
    result = fold_torch(model, example_inputs=_x())
    (skipped,) = result.skipped
    assert "applies act (ReLU) after normalizing, so it cannot fold into the op after it" in skipped.reason


def test_bn_act_with_identity_act_folds_into_the_layer_after_it(fold_check, randomize) -> None:
    model = randomize(nn.Sequential(BatchNormAct2d(3, act=nn.Identity()), nn.Conv2d(3, 4, 1))).eval()
    result = fold_check(model, _x(), folded=1, left=0, example_inputs=_x())
    assert result.folded[0].side == "input"


@pytest.mark.parametrize("build", [
    pytest.param(lambda: NotABatchNorm(4), id="ignores-statistics"),
    pytest.param(lambda: nn.Module(), id="empty-module"),
    pytest.param(lambda: nn.GroupNorm(2, 4), id="group-norm"),
])
def test_look_alikes_are_not_batch_norms(build: Callable[[], nn.Module], randomize) -> None:
    assert recognize(randomize(build()).eval()) is None


def test_look_alike_is_left_computing_what_it_computed(randomize) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), NotABatchNorm(4))).eval()
    result = fold_torch(model, example_inputs=_x())
    assert result.folded == [] and result.skipped == []
    x = _x()
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_probe_gives_the_ranks_a_frozen_batch_norm_accepts(randomize) -> None:
    kind = recognize(randomize(FrozenBatchNorm2d(5)).eval())
    assert kind is not None and kind.kind == "frozen batchnorm" and kind.ranks == frozenset({4})
    kind = recognize(randomize(BatchNormAct2d(5)).eval())
    assert kind is not None and kind.kind == "batchnorm+act" and kind.post == ("act",)


def test_frozen_batch_norm_with_hooks_is_kept_with_a_reason(randomize) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))).eval()
    model[1].register_forward_hook(lambda *_: None)
    result = fold_torch(model, example_inputs=_x())
    assert [s.bn for s in result.skipped] == ["1"] and "forward hooks" in result.skipped[0].reason


class TwoSites(nn.Module):
    """One norm module applied after two different convs (and, with ``bare``, also to the raw input)."""

    def __init__(self, norm: nn.Module, bare: bool = False) -> None:
        super().__init__()
        self.c1, self.c2, self.norm, self.bare = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1), norm, bare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.c1(x)) + self.norm(self.c2(x))
        return y + self.norm(x) if self.bare else y


@pytest.mark.parametrize("norm", [
    pytest.param(lambda: nn.BatchNorm2d(3), id="batchnorm"),
    pytest.param(lambda: BatchNormAct2d(3, act=nn.ReLU()), id="batchnorm-act"),
    pytest.param(lambda: FrozenBatchNorm2d(3), id="frozen"),
])
def test_norm_applied_at_two_places_folds_at_each(norm, fold_check, randomize) -> None:
    result = fold_check(randomize(TwoSites(norm())).eval(), _x(), folded=1, left=0, example_inputs=_x())
    (folded,) = result.folded
    assert folded.bn == "norm" and folded.into == "c1, c2"


def test_norm_applied_where_one_place_cannot_fold_is_kept_and_says_where(fold_check, randomize) -> None:
    result = fold_check(randomize(TwoSites(nn.BatchNorm2d(3), bare=True)).eval(), _x(), folded=0, left=1,
                        example_inputs=_x())
    (skipped,) = result.skipped
    assert skipped.reason.startswith("norm is applied at 3 places; folded at 2 of 3 places, kept at norm_2: ")


class FlattenHead(nn.Module):
    """conv -> BN -> flatten -> Linear, the flatten in one of its three spellings."""

    def __init__(self, how: str, bn: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.how, self.conv, self.bn = how, nn.Conv2d(3, 4, 3), bn(4)
        self.flat, self.fc = nn.Flatten(), nn.Linear(4 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))  # the relu keeps the BN from folding into the conv: it must fold forwards
        y = self.bn(y)
        y = {"module": self.flat, "function": lambda t: torch.flatten(t, 1), "method": lambda t: t.flatten(1)}[
            self.how](y)
        return self.fc(y)


@pytest.mark.parametrize("how", ["module", "function", "method"])
@pytest.mark.parametrize("shapes", [True, False], ids=["shapes", "no-shapes"])
def test_bn2d_flatten_linear_folds_into_the_linear(how: str, shapes: bool, fold_check, randomize) -> None:
    options = {"example_inputs": _x()} if shapes else {}
    result = fold_check(randomize(FlattenHead(how)).eval(), _x(), folded=1, left=0, **options)
    assert [(f.bn, f.into, f.side) for f in result.folded] == [("bn", "fc", "input")]


def test_flatten_from_axis_2_is_not_a_channel_block(randomize) -> None:
    class Flatten2(FlattenHead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.bn(F.relu(self.conv(x))), 2).mean(1).repeat(1, 4))

    result = fold_torch(randomize(Flatten2("module")).eval(), example_inputs=_x())
    assert result.folded == [] and [s.bn for s in result.skipped] == ["bn"]


class OneChannel(nn.Module):
    """BatchNorm1d(1) over (N, 1, F) around Linear layers acting on the last axis: a scalar map."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.fc1, self.bn, self.fc2 = nn.BatchNorm1d(1), nn.Linear(6, 5), nn.BatchNorm1d(1), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(self.pre(x)))))


def test_one_channel_batch_norm_broadcasts_into_linear_layers(fold_check, randomize) -> None:
    x = torch.randn(4, 1, 6)
    result = fold_check(randomize(OneChannel()).eval(), x, folded=2, left=0, example_inputs=x)
    assert {(f.bn, f.into, f.side) for f in result.folded} == {("pre", "fc1", "input"), ("bn", "fc1", "output")}


class MixedConv(nn.Module):
    """MixNet's mixed convolution: channel groups through kernels of different sizes, concatenated, then BN."""

    def __init__(self, shared: bool = False, dim: int = 1) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 4, 5, padding=2, bias=False)
        self.bn, self.shared, self.dim = BatchNormAct2d(6, act=nn.ReLU()), shared, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = self.bn(torch.cat([a, self.b(x)], dim=self.dim))
        return y + a.mean() if self.shared else y


def test_bn_after_a_concatenation_of_layers_folds_slice_by_slice(fold_check, randomize) -> None:
    result = fold_check(randomize(MixedConv()).eval(), _x(), folded=1, left=0, example_inputs=_x())
    assert [(f.bn, f.into) for f in result.folded] == [("bn", "a, b")]


def test_concatenation_whose_input_is_used_elsewhere_keeps_the_bn(fold_check, randomize) -> None:
    result = fold_check(randomize(MixedConv(shared=True)).eval(), _x(), folded=0, left=1, example_inputs=_x())
    assert "input 0 of cat() (cat): the output of a (Conv2d) is also used by" in result.skipped[0].reason
