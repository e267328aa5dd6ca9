"""Benchmark 4, real architectures: batch norms left by bnfold and by ONNX tools on torchvision and timm models.

Every model in :data:`ARCHS` is built from its library's definition with random weights
(``pretrained=False`` / ``weights=None``: nothing is downloaded) and **non-trivial batch-norm
statistics** (:func:`randomize_batchnorms`: running mean N(0, 0.5), running var U(0.5, 2),
gamma U(0.5, 1.5), beta N(0, 0.2)), so that every fold really changes the neighbouring weights.
Per model:

* BN applications before and after ``bnfold.fold(model, example_inputs=x)`` (one forward pass,
  counted by :func:`batchnorm_calls`), and in the artifact: the ONNX file bnfold's pipeline writes
  (:func:`bnfold.pipeline.fold_and_certify`, what ``bnfold fold`` does, on random inputs only);
* the fold's max error against a float64 copy of the original, and its median time;
* the ORIGINAL model exported without any fusion (:func:`export_unfolded`), then folded by bnfold's
  ONNX rewriter, onnxslim, onnxoptimizer (its fuse and elimination passes, incl. ``fuse_bn_into_conv``)
  and onnxscript's optimizer (the default rewrite rules, incl. its batch-norm fusions): the
  BatchNormalization nodes each leaves;
* onnxruntime latency at batch 1, one thread, of the unfolded export vs the artifact, with graph
  optimizations off and on: medians of interleaved calls (:func:`bnfold.latency.interleaved_medians`).

The test tier ``tests/real`` asserts on the same table and helpers. Needs torchvision, timm, onnxslim
and onnxoptimizer: the environment of the README's "Real architectures" (``pip install -e ".[torch,real]"``
after torch and its matching torchvision)::

    python benchmarks/real_archs.py [--quick | --smoke] [--out DIR]

A model that a step fails on gets the failure's text in its row instead of that number.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

if TYPE_CHECKING:  # the real imports are lazy: this module imports without torch
    import onnx
    import torch
    from torch import nn


@dataclass(frozen=True)
class Arch:
    """One real architecture: how to build it (random init) and the input it runs on."""

    name: str  # "library/model", the test id
    family: str  # e.g. "ResNet", "EfficientNet"
    input_shape: tuple[int, ...]  # one sample, no batch axis; small to keep CPU time low
    build: Callable[[], nn.Module] = field(repr=False)
    cli: bool = False  # also run `bnfold fold` end to end on it in the test tier
    smoke: bool = False  # part of the --smoke run
    note: str = ""


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _frozen_resnet18() -> nn.Module:
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    return torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=FrozenBatchNorm2d)


def _fpn_backbone() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)


def _r3d_18() -> nn.Module:
    from torchvision.models.video import r3d_18

    return r3d_18(weights=None, num_classes=10)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


IMAGE = (3, 64, 64)
ARCHS: tuple[Arch, ...] = (
    Arch("torchvision/resnet18", "ResNet", IMAGE, _torchvision("resnet18", num_classes=10), cli=True, smoke=True),
    Arch("torchvision/mobilenet_v3_small", "MobileNet", IMAGE, _torchvision("mobilenet_v3_small", num_classes=10)),
    Arch("torchvision/efficientnet_b0", "EfficientNet", IMAGE, _torchvision("efficientnet_b0", num_classes=10)),
    Arch("torchvision/regnet_y_400mf", "RegNet", IMAGE, _torchvision("regnet_y_400mf", num_classes=10)),
    Arch("torchvision/densenet121", "DenseNet", IMAGE, _torchvision("densenet121", num_classes=10),
         note="BN before conv (pre-activation): folds only into a following conv without zero padding"),
    Arch("torchvision/r3d_18", "3-D video ResNet", (3, 4, 32, 32), _r3d_18),
    Arch("torchvision/resnet18_frozenbn", "ResNet, FrozenBatchNorm2d", IMAGE, _frozen_resnet18, cli=True,
         smoke=True, note="torchvision.ops.FrozenBatchNorm2d (detection backbones); exports as Mul/Add, "
                          "not BatchNormalization"),
    Arch("torchvision/resnet18_fpn", "detection backbone (FPN), FrozenBatchNorm2d", IMAGE, _fpn_backbone,
         note="resnet_fpn_backbone: dict of 5 feature maps"),
    Arch("timm/efficientnet_b0", "EfficientNet", IMAGE, _timm("efficientnet_b0"), cli=True, smoke=True),
    Arch("timm/tf_efficientnet_b0", "EfficientNet (TF 'same' padding)", IMAGE, _timm("tf_efficientnet_b0")),
    Arch("timm/mobilenetv3_small_100", "MobileNetV3", IMAGE, _timm("mobilenetv3_small_100")),
    Arch("timm/mixnet_s", "MixNet", IMAGE, _timm("mixnet_s")),
    Arch("timm/regnety_002", "RegNet", IMAGE, _timm("regnety_002")),
    Arch("timm/rexnet_100", "ReXNet", IMAGE, _timm("rexnet_100")),
    Arch("timm/ghostnet_100", "GhostNet", IMAGE, _timm("ghostnet_100")),
    Arch("timm/cspresnet50", "CSPResNet", IMAGE, _timm("cspresnet50")),
    Arch("timm/cspdarknet53", "CSPDarkNet", IMAGE, _timm("cspdarknet53")),
    Arch("timm/darknet53", "DarkNet", IMAGE, _timm("darknet53")),
    Arch("timm/ese_vovnet19b_dw", "VoVNet", IMAGE, _timm("ese_vovnet19b_dw")),
    Arch("timm/dla34", "DLA", IMAGE, _timm("dla34")),
    Arch("timm/dpn68", "DPN", IMAGE, _timm("dpn68")),
    Arch("timm/hrnet_w18_small", "HRNet", IMAGE, _timm("hrnet_w18_small")),
    Arch("timm/res2net50_14w_8s", "Res2Net", IMAGE, _timm("res2net50_14w_8s")),
    Arch("timm/selecsls42b", "SelecSLS", IMAGE, _timm("selecsls42b")),
    Arch("timm/resnet26d", "ResNet-D", IMAGE, _timm("resnet26d")),
    Arch("timm/repvgg_a0", "RepVGG", IMAGE, _timm("repvgg_a0"), cli=True,
         note="parallel 3x3 conv+BN, 1x1 conv+BN and identity-BN branches summed: the identity BN has no conv"),
)
BY_NAME = {a.name: a for a in ARCHS}


def build(name: str) -> nn.Module:
    """The model ``name`` of :data:`ARCHS`, randomly initialized (a ``bnfold fold --model`` factory)."""
    try:
        arch = BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(BY_NAME)}") from None
    return arch.build()


def prepared(arch: Arch, seed: int = 0) -> nn.Module:
    """``arch`` built with seed ``seed``, non-trivial batch-norm statistics, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return randomize_batchnorms(arch.build(), seed).eval()


def example_inputs(arch: Arch, batch: int = 2, seed: int = 1) -> torch.Tensor:
    import torch

    return torch.randn((batch, *arch.input_shape), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Batch norms: statistics and counting


def is_batchnorm(module: nn.Module) -> bool:
    """torch's batch norms (timm's BatchNormAct2d included) and anything else that stores BN statistics
    (torchvision's FrozenBatchNorm2d keeps weight, bias, running_mean and running_var as buffers)."""
    import torch
    from torch import nn

    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # running statistics, but per sample
        return False
    return all(isinstance(getattr(module, k, None), torch.Tensor) for k in ("running_mean", "running_var",
                                                                            "weight", "bias"))


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set every batch norm's statistics and affine parameters to random values (in place):
    running mean N(0, 0.5), running var U(0.5, 2), gamma U(0.5, 1.5), beta N(0, 0.2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not is_batchnorm(m):
                continue
            c = m.running_mean.shape[0]
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


@dataclass(frozen=True)
class BatchnormCalls:
    """Batch norms applied in one forward pass (a module called twice counts twice)."""

    aten: int  # torch batch-norm ops (BatchNorm*d, timm's BatchNormAct2d, F.batch_norm): ONNX BatchNormalization
    frozen: int  # FrozenBatchNorm2d-style arithmetic (x * scale + shift from BN buffers): ONNX Mul/Add

    @property
    def total(self) -> int:
        return self.aten + self.frozen


def batchnorm_calls(model: nn.Module, inputs: torch.Tensor) -> BatchnormCalls:
    """Count the batch norms ``model`` applies to ``inputs``: the aten batch-norm ops that run, plus
    calls of modules that hold BN statistics but compute without them (FrozenBatchNorm2d), plus, in
    torch.fx graphs, batch norms traced through into arithmetic (:func:`_inlined_batchnorms`)."""
    import torch
    from torch import fx
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        """Counts batch-norm ops; ops that run inside one (its decomposition) do not reach the mode."""

        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = func.__name__
            if "batch_norm" in name and "backward" not in name:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    frozen = 0

    def on_call(module: nn.Module, _args: Any) -> None:
        nonlocal frozen
        frozen += _inlined_batchnorms(module) if isinstance(module, fx.GraphModule) else 1

    hooks = [m.register_forward_pre_hook(on_call) for m in model.modules()
             if isinstance(m, fx.GraphModule) or (is_batchnorm(m) and not isinstance(m, _batchnorm_base()))]
    counter = Count()
    try:
        with torch.inference_mode(), counter:
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return BatchnormCalls(aten=counter.ops, frozen=frozen)


def _batchnorm_base() -> type:
    from torch import nn

    return nn.modules.batchnorm._BatchNorm


def _inlined_batchnorms(gm: Any) -> int:
    """Batch norms a torch.fx graph computes as plain arithmetic (a batch-norm module traced through): a
    read of a ``running_var`` that feeds arithmetic rather than a batch-norm call, or a per-channel constant
    (shape ``(1, C, 1, ...)``) multiplying an activation, which is what tracing leaves of a
    FrozenBatchNorm2d (it computes the scale at trace time)."""
    import functools
    import operator

    import torch
    from torch import fx

    n = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        if str(node.target).endswith("running_var"):
            n += not any(u.op == "call_function" and "batch_norm" in getattr(u.target, "__name__", "")
                         for u in node.users)
            continue
        value = functools.reduce(getattr, str(node.target).split("."), gm)
        per_channel = (isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[0] == 1
                       and value.shape[1] > 1 and all(d == 1 for d in value.shape[2:]))
        n += per_channel and any(
            u.op == "call_function" and u.target in (operator.mul, torch.mul)
            and any(isinstance(a, fx.Node) and a.op != "get_attr" for a in u.args) for u in node.users)
    return n


def onnx_batchnorms(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph and in model-local functions."""
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node) + sum(
        n.op_type == "BatchNormalization" for f in model.functions for n in f.node)


# ---------------------------------------------------------------------------------------------
# ONNX: the unfolded export and what the ONNX tools leave


def export_unfolded(model: nn.Module, input_shape: tuple[int, ...], opset: int = 17) -> onnx.ModelProto:
    """The ORIGINAL model in ONNX with every batch norm kept: the TorchScript exporter without constant
    folding (with it, the exporter fuses Conv+BN itself), then onnxscript's constant folding, which
    fuses nothing, so weights are initializers and not Identity outputs. Dynamic batch axis."""
    import onnx
    import torch
    from onnxscript import ir, optimizer

    x = torch.zeros((2, *input_shape))
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    graph = ir.serde.deserialize_model(onnx.load_from_string(buf.getvalue()))
    optimizer.fold_constants(graph)
    optimizer.remove_unused_nodes(graph)
    return ir.serde.serialize_model(graph)


def onnxslim_batchnorms(model: onnx.ModelProto) -> int:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        return onnx_batchnorms(onnxslim.slim(copy.deepcopy(model)))


def onnxoptimizer_batchnorms(model: onnx.ModelProto) -> int:
    import onnxoptimizer

    return onnx_batchnorms(onnxoptimizer.optimize(copy.deepcopy(model),
                                                  onnxoptimizer.get_fuse_and_elimination_passes()))


def onnxscript_batchnorms(model: onnx.ModelProto) -> int:
    from onnxscript import optimizer

    return onnx_batchnorms(optimizer.optimize(copy.deepcopy(model)))


ONNX_TOOLS: dict[str, Callable[[onnx.ModelProto], int]] = {
    "bnfold (ONNX)": lambda m: onnx_batchnorms(_bnfold_onnx(m)),
    "onnxslim": onnxslim_batchnorms,
    "onnxoptimizer": onnxoptimizer_batchnorms,
    "onnxscript": onnxscript_batchnorms,
}


def _bnfold_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    import bnfold

    return bnfold.fold(model).model


# ---------------------------------------------------------------------------------------------
# Comparing with the float64 reference


def outputs(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Every output tensor of ``model`` (a dict or tuple of feature maps included), flattened in order."""
    import torch

    with torch.inference_mode():
        out = model(inputs)
    return list(_tensors(out))


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)
    else:
        yield out


def float64_error(original: nn.Module, folded: nn.Module, inputs: torch.Tensor) -> list[Any]:
    """Per output: :class:`bnfold.tolerance.Comparison` of ``folded`` (float32) against a float64 copy of
    ``original``, with bnfold's default tolerance ``1e-5 + 1e-4 * max|ref|``."""
    import torch

    from bnfold.tolerance import Tolerance

    ref = outputs(copy.deepcopy(original).to(torch.float64).eval(), inputs.to(torch.float64))
    got = outputs(folded, inputs)
    if len(ref) != len(got):
        raise ValueError(f"folded model has {len(got)} outputs, the original {len(ref)}")
    return [Tolerance().compare(g.double().numpy(), r.numpy()) for g, r in zip(got, ref, strict=True)]


# ---------------------------------------------------------------------------------------------
# The benchmark


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def measure(arch: Arch, *, fold_repeats: int, latency_repeats: int) -> dict[str, Any]:
    """One row of the table (see the module docstring); failures are recorded, not raised."""
    import numpy as np

    import bnfold
    from bnfold.latency import interleaved_medians
    from bnfold.pipeline import Config, Source, fold_and_certify
    from bnfold.verification import ort_runner

    model = prepared(arch)
    x = example_inputs(arch)
    row: dict[str, Any] = {"model": arch.name, "family": arch.family, "input_shape": list(arch.input_shape),
                           "note": arch.note, "bn_modules": sum(is_batchnorm(m) for m in model.modules()),
                           "errors": {}}
    before = batchnorm_calls(model, x)
    row["bn_before"] = before.total
    row["bn_before_frozen"] = before.frozen
    try:
        times = []
        for _ in range(fold_repeats):
            start = time.perf_counter()
            result = bnfold.fold(model, example_inputs=x)
            times.append(time.perf_counter() - start)
        row["fold_s"] = statistics.median(times)
        row["fold_counts"] = result.counts
        row["kept"] = [{"bn": s.bn, "reason": s.reason} for s in result.skipped]
        row["bn_after_pytorch"] = batchnorm_calls(result.model, x).total
        cmp = float64_error(model, result.model, x)
        row["max_abs_error"] = max(c.max_abs for c in cmp)
        row["max_rel_error"] = max(c.max_rel for c in cmp)
        row["within_tolerance"] = all(c.passed for c in cmp)
    except Exception as exc:
        row["errors"]["fold"] = _failure(exc)
    try:
        unfolded = export_unfolded(model, arch.input_shape)
        row["bn_exported"] = onnx_batchnorms(unfolded)
        row["nodes_exported"] = len(unfolded.graph.node)
        row["onnx_tools"] = {}
        for tool, count in ONNX_TOOLS.items():
            try:
                row["onnx_tools"][tool] = count(unfolded)
            except Exception as exc:
                row["errors"][tool] = _failure(exc)
    except Exception as exc:
        unfolded = None
        row["errors"]["export"] = _failure(exc)
    artifact = None
    try:
        first = outputs(model, x[:1])[0]
        source = Source(Path(arch.name), "", "checkpoint", model, arch.name, list(arch.input_shape),
                        [str(i) for i in range(first.shape[-1])] if first.ndim == 2 else [])
        outcome = fold_and_certify(source, Config(n_random=8, use_data=False))
        artifact = outcome.onnx_model
        row["bn_artifact"] = outcome.batchnorm_nodes
        row["nodes_artifact"] = len(artifact.graph.node)
        row["certificate"] = {"folded": outcome.certificate.folded, "kept": outcome.certificate.kept}
    except Exception as exc:
        row["errors"]["pipeline"] = _failure(exc)
    if unfolded is not None and artifact is not None:
        x1 = np.asarray(x[:1].numpy())
        for optimize in (False, True):
            runners = {"unfolded": ort_runner(unfolded, optimize=optimize, threads=1),
                       "folded": ort_runner(artifact, optimize=optimize, threads=1)}
            med = interleaved_medians(runners, x1, repeats=latency_repeats, warmup=max(2, latency_repeats // 10))
            row[f"ort_{'on' if optimize else 'off'}_ms"] = {k: v * 1e3 for k, v in med.items()}
    return row


def run(out: Path, *, mode: str = "full", only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure every architecture and write ``real_archs.json``, ``real_archs.md`` and ``real_archs.png``."""
    import torch

    common.check_mode(mode)
    torch.set_num_threads(1)
    archs = [a for a in ARCHS if (not only or a.name in only) and (mode != "smoke" or a.smoke)]
    fold_repeats, latency_repeats = {"full": (3, 200), "quick": (1, 20), "smoke": (1, 3)}[mode]
    rows = []
    start = time.perf_counter()
    for arch in archs:
        common.log(f"real architectures: {arch.name}")
        rows.append(measure(arch, fold_repeats=fold_repeats, latency_repeats=latency_repeats))
    body = {"benchmark": "real_archs", "mode": mode, "machine": {**common.machine(), **_versions()},
            "settings": {"threads": 1, "fold_repeats": fold_repeats, "latency_repeats": latency_repeats,
                         "latency_batch": 1, "tolerance": "1e-5 + 1e-4 * max|ref|"},
            "seconds": time.perf_counter() - start, "results": rows}
    common.write_json(out / "real_archs.json", body)
    (out / "real_archs.md").write_text(markdown(body))
    plot(body, out / "real_archs.png")
    return body


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torchvision", "timm", "onnx", "onnxscript", "onnxslim", "onnxoptimizer"):
        with contextlib.suppress(PackageNotFoundError):
            found[pkg] = version(pkg)
    return found


def _cell(row: dict[str, Any], key: str, step: str) -> str:
    return str(row[key]) if key in row else f"fails ({step})"


def markdown(body: dict[str, Any]) -> str:
    rows = []
    for r in body["results"]:
        tools = r.get("onnx_tools", {})
        err = f"{r['max_abs_error']:.2g} ({r['max_rel_error']:.1e})" if "max_abs_error" in r else "-"
        if "within_tolerance" in r and not r["within_tolerance"]:
            err = f"**{err} FAIL**"
        lat = [f"{r[k]['unfolded']:.2f} / {r[k]['folded']:.2f}" if k in r else "-"
               for k in ("ort_off_ms", "ort_on_ms")]
        rows.append([r["model"], r["bn_before"], _cell(r, "bn_after_pytorch", "fold"),
                     _cell(r, "bn_artifact", "pipeline"), r.get("bn_exported", "-"),
                     *[tools.get(t, "-") for t in ONNX_TOOLS], err,
                     f"{r['fold_s']:.2f}" if "fold_s" in r else "-",
                     f"{r.get('nodes_exported', '-')} / {r.get('nodes_artifact', '-')}", *lat])
    text = (f"Run of {body['machine']['date_utc']} ({body['mode']}), torch {body['machine'].get('torch')}, "
            f"torchvision {body['machine'].get('torchvision')}, timm {body['machine'].get('timm')}, "
            f"onnxruntime {body['machine']['onnxruntime']}; {body['seconds']:.0f} s.\n\n"
            "Batch norms applied per forward pass: before, after the PyTorch fold, in the ONNX file bnfold writes, "
            "in the unfolded export, and left by each ONNX tool on that export. Error: max |folded - float64 "
            "reference| (relative to max |reference|). Fold time: median seconds. ONNX nodes and onnxruntime "
            "(median ms at batch 1, one thread): unfolded export / bnfold artifact.\n\n")
    text += common.markdown_table(
        ["model", "BN before", "BN after PyTorch fold", "BN in artifact", "BN exported",
         *[f"BN left: {t}" for t in ONNX_TOOLS], "max error", "fold s", "ONNX nodes", "ORT opt off ms",
         "ORT opt on ms"], rows)
    failures = [(r["model"], step, msg) for r in body["results"] for step, msg in r["errors"].items()]
    if failures:
        text += "\n### Failures\n\n" + common.markdown_table(["model", "step", "error"], failures)
    kept = [(r["model"], len(r["kept"]), f"{r['kept'][0]['bn']}: {r['kept'][0]['reason']}")
            for r in body["results"] if r.get("kept")]
    if kept:
        text += ("\n### Batch norms the PyTorch fold kept (first one's reason; all in real_archs.json)\n\n"
                 + common.markdown_table(["model", "kept", "e.g."], kept))
    return text


def plot(body: dict[str, Any], path: Path) -> None:
    """Left: a table of batch norms left per model (rows) and fold (columns), shaded by the fraction of
    the model's batch norms left; right: onnxruntime latency ratio unfolded / folded."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    results = body["results"]
    columns = [("bnfold\nPyTorch fold", lambda r: r.get("bn_after_pytorch")),
               ("bnfold\nartifact", lambda r: r.get("bn_artifact"))]
    columns += [(f"{t.replace(' (ONNX)', '')}\n{'ONNX fold' if t.startswith('bnfold') else 'on export'}",
                 lambda r, t=t: r.get("onnx_tools", {}).get(t)) for t in ONNX_TOOLS]
    left = np.array([[np.nan if (v := get(r)) is None else v for _, get in columns] for r in results], float)
    before = np.array([r["bn_before"] for r in results], float)
    n = len(results)
    fig = Figure(figsize=(12, 0.32 * n + 2.0), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1], sharey=True)
    ax.imshow(left / before[:, None], cmap="OrRd", vmin=0, vmax=1.4, aspect="auto")
    for i in range(n):
        for j in range(len(columns)):
            v = left[i, j]
            ax.text(j, i, "fails" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8,
                    color="0.5" if np.isnan(v) else "black", weight="normal" if v == 0 else "bold")
    ax.set_xticks(range(len(columns)), [c for c, _ in columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n), [f"{r['model']} ({r['bn_before']})" for r in results], fontsize=8)
    ax.set_title("Batch norms left (of the count in brackets), random init, random BN statistics;\n"
                 "shade = fraction left, 'fails' = the step failed (see real_archs.md)", fontsize=9)
    for i, opt in enumerate(("off", "on")):
        ratio = [r[f"ort_{opt}_ms"]["unfolded"] / r[f"ort_{opt}_ms"]["folded"] if f"ort_{opt}_ms" in r else np.nan
                 for r in results]
        ax2.barh(np.arange(n) - 0.2 + 0.4 * i, ratio, 0.4, label=f"graph optimizations {opt}")
    ax2.axvline(1.0, color="black", lw=0.8)
    ax2.set_xlabel("onnxruntime latency, unfolded export / bnfold artifact\n(batch 1, 1 thread, median; "
                   "> 1: folding helped)", fontsize=8)
    ax2.set_title(f"{body['machine']['cpu']}, {body['machine']['cores']} cores,\n"
                  f"{body['machine']['date_utc'][:16]} UTC ({body['mode']} run)", fontsize=9)
    fig.legend(*ax2.get_legend_handles_labels(), fontsize=8, loc="outside lower right", ncols=2)
    ax2.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def redraw(out: Path) -> None:
    """Re-render real_archs.md and real_archs.png from real_archs.json in ``out``."""
    import json

    body = json.loads((out / "real_archs.json").read_text())
    (out / "real_archs.md").write_text(markdown(body))
    plot(body, out / "real_archs.png")


def main(argv: list[str] | None = None) -> int:
    return common.run_script(__doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
