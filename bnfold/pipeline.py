"""The fold pipeline behind the CLI: load -> fold -> verify -> export -> check -> certify -> write.

Every step either succeeds or raises; nothing is written until every check has passed:

1. *load* a bnfold checkpoint / state_dict (:func:`bnfold.checkpoint.load_model`) or an ONNX file;
2. *fold* with :func:`bnfold.fold`;
3. *verify* folded vs original against a float64 reference (:func:`bnfold.verification.verify`)
   on random N(0, 1) inputs of the model's input shape and, when a data set is known, on real
   validation samples;
4. *export* to ONNX (:func:`bnfold.export.export_model`: the dynamo exporter, the TorchScript
   one if that fails; neither fuses a batch norm) and *fold the exported graph* with the ONNX
   rewriter, which catches batch norms the PyTorch fold kept; :func:`bnfold.accounting.combine`
   merges both folds into one account of every batch norm, and
   :func:`bnfold.accounting.check_against` checks it against the graph's BatchNormalization nodes;
5. *verify* that final graph in onnxruntime (optimizations off) against the original PyTorch
   model's float64 reference on the same inputs;
6. *certify* that graph: attach a :class:`~bnfold.certificate.Certificate` with the measured
   errors, the fold counts, the BatchNormalization nodes and opset it has, and a self-test
   vector, and re-check all of it on the serialized bytes;
7. *write* atomically: an output file, a new repository version, a JSON report.

With ``quantize`` (``--quantize int8``), step 6's certified graph is quantized and held to the
int8 contract (:mod:`bnfold.quantize`) before step 7, and the int8 graph is what is written.

What is verified, counted and certified is the graph that is written. An ONNX input is folded
with the ONNX rewriter and verified with onnxruntime (original vs folded); steps 6 and 7 are the
same. The CLI commands ``fold``, ``inspect`` and ``verify`` are thin wrappers over :func:`run`,
:func:`inspect_file` and :func:`compare_files`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

import bnfold
from bnfold import accounting, atomic, certificate, export, repository
from bnfold._version import __version__
from bnfold.errors import BnfoldError, VerificationFailed
from bnfold.files import existing_file, sha256_file
from bnfold.result import FoldResult
from bnfold.tolerance import Comparison, Tolerance
from bnfold.verification import VerifyReport, baseline_outputs, ort_runner, verify

if TYPE_CHECKING:
    from bnfold.data import Dataset
    from bnfold.quantize import QuantizeOptions

Status = Callable[[str], None]
Kind = Literal["checkpoint", "onnx"]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class LoadOptions:
    """How to rebuild a model from a plain state_dict (a bnfold checkpoint names its own)."""

    arch: str | None = None  # a bnfold architecture name, e.g. "cnn"
    arch_config: dict[str, Any] | None = None  # keyword overrides for the architecture
    model_factory: str | None = None  # "package.module:factory" or "path/to/file.py:factory"
    input_shape: tuple[int, ...] | None = None  # per sample, no batch axis; overrides what the file records


@dataclass(frozen=True)
class Config:
    """Options of the verification and export steps; defaults are what ``bnfold fold`` uses."""

    tolerance: Tolerance = field(default_factory=Tolerance)
    n_random: int = 64  # random N(0, 1) samples per check
    seed: int = 0  # seeds the random inputs
    data: str | None = None  # bundled data set name or data path; default: the checkpoint's data set
    use_data: bool = True  # verify on real validation samples when a data set is known
    max_data: int = 1024  # at most this many validation samples
    selftest_samples: int = 4  # samples in the certificate's self-test vector
    opset: int = 17
    exporter: export.Exporter = "auto"  # dynamo, falling back to torchscript (see bnfold.export)
    input_name: str = "input"
    output_name: str = "logits"


@dataclass
class Source:
    """A loaded input file: a PyTorch model (from a checkpoint) or an ONNX model."""

    path: Path
    sha256: str
    kind: Kind
    model: Any  # torch.nn.Module (eval, float32) or onnx.ModelProto
    architecture: str
    input_shape: list[int]  # per sample, no batch axis
    class_labels: list[str]
    dataset: str | None = None  # the training data set: a bundled name, or the data path as given
    data_seed: int = 0  # the seed the checkpoint's train/validation split used
    num_outputs: int | None = None  # logits per sample, when known
    feature_names: list[str] = field(default_factory=list)  # tabular inputs: the columns, in input order
    data_paths: list[str] = field(default_factory=list)  # where a training data file may be, first match wins
    data_options: dict[str, Any] = field(default_factory=dict)  # label_column, image_size, val_fraction
    notes: list[str] = field(default_factory=list)  # what loading decided (an --input-shape override)


@dataclass
class Check:
    """One verification: ``stage`` is the runtime of the candidate ("pytorch" or "onnxruntime")."""

    stage: str
    report: VerifyReport

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.report.inputs}"


@dataclass
class Outcome:
    """Everything the pipeline measured, and the certified ONNX model (not yet written).

    ``fold`` accounts for every batch norm across both folds (its model is the final ONNX graph);
    ``stages`` holds each fold's own counts, ``exported`` how the exporter ran.
    """

    source: Source
    fold: FoldResult[Any]
    checks: list[Check]
    onnx_model: onnx.ModelProto
    certificate: certificate.Certificate
    selftest: Comparison
    timings: dict[str, float]
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # pipeline remarks (fold remarks are in fold.notes)
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    exported: export.Exported | None = None  # how a checkpoint was exported (None for an ONNX input)
    requested_opset: int | None = None

    @property
    def batchnorm_nodes(self) -> int:
        return len(export.batchnorm_nodes(self.onnx_model))

    @property
    def exporter(self) -> str:
        return self.exported.exporter if self.exported is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "bnfold_version": __version__,
            "passed": True,
            "source": _source_dict(self.source),
            "fold": _fold_dict(self.fold, self.stages),
            "notes": list(self.notes),
            "checks": {c.key: {"stage": c.stage, **c.report.to_dict()} for c in self.checks},
            "onnx": {
                "opset": export.opset_of(self.onnx_model),
                "requested_opset": self.requested_opset,
                "exporter": self.exporter or None,
                "exporter_fallback": self.exported.fallback if self.exported is not None else None,
                "ops": export.op_counts(self.onnx_model),
                "batchnorm_nodes": self.batchnorm_nodes,
                "input": export.graph_input(self.onnx_model)[0],
                "output": self.onnx_model.graph.output[0].name,
                "dynamic_batch": export.has_dynamic_batch(self.onnx_model),
            },
            "selftest": {"max_abs_error": self.selftest.max_abs, "allowed": self.selftest.allowed,
                         "passed": self.selftest.passed},
            "tolerance": self.certificate.tolerance.to_dict(),
            "timings_s": self.timings,
            "written": self.written,
        }


def _source_dict(src: Source) -> dict[str, Any]:
    return {
        "path": str(src.path), "sha256": src.sha256, "kind": src.kind, "architecture": src.architecture,
        "input_shape": src.input_shape, "class_labels": src.class_labels, "num_outputs": src.num_outputs,
        "feature_names": src.feature_names, "dataset": src.dataset,
    }


def _fold_dict(fold: FoldResult[Any], stages: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "counts": fold.counts,
        "stages": stages,
        "batchnorms": [{"bn": bn, "status": st, "stage": stage, "detail": detail}
                       for bn, st, stage, detail in fold.staged_rows()],
        "notes": list(fold.notes),
    }


# ---------------------------------------------------------------------------------------------
# Loading


def load_source(path: str | Path, options: LoadOptions | None = None) -> Source:
    """Load a checkpoint/state_dict (``options`` say how to rebuild a bare state_dict) or an ONNX file."""
    p = existing_file(path, "input", "a checkpoint (.pt) or an ONNX file (.onnx)")
    opts = options or LoadOptions()
    digest = sha256_file(p)
    if export.is_onnx_file(p):
        return _load_onnx(p, digest, opts)
    from bnfold.checkpoint import load_model

    loaded = load_model(p, arch=opts.arch, arch_config=opts.arch_config, model_factory=opts.model_factory,
                        input_shape=opts.input_shape)
    train_config = loaded.meta.get("train_config") or {}
    data_options = {k: train_config[k] for k in ("label_column", "image_size", "val_fraction")
                    if train_config.get(k) is not None}
    location = loaded.meta.get("data_location") or {}
    paths = [str(location["absolute"])] if location.get("absolute") else []
    if location.get("relative"):
        paths.append(str(p.parent / location["relative"]))  # the checkpoint and its data moved together
    if loaded.dataset:
        paths.append(str(loaded.dataset))  # as given at training time: relative to where it ran
    return Source(p, digest, "checkpoint", loaded.model, str(loaded.arch or type(loaded.model).__name__),
                  [int(d) for d in loaded.input_shape], [str(c) for c in (loaded.class_labels or [])],
                  loaded.dataset, _int_or(loaded.meta.get("seed"), 0), num_outputs=len(loaded.class_labels or []),
                  feature_names=[str(f) for f in loaded.meta.get("feature_names") or []],
                  data_paths=list(dict.fromkeys(paths)), data_options=data_options, notes=list(loaded.notes))


def _load_onnx(p: Path, digest: str, opts: LoadOptions) -> Source:
    model = export.read_onnx(p)
    meta = {e.key: e.value for e in model.metadata_props}
    cert = _certificate_or_none(meta)
    notes: list[str] = []
    if opts.input_shape is not None:
        shape = export.sample_shape(model, list(opts.input_shape))
        if not all(isinstance(d, int) for d in export.graph_input(model)[1][1:]):
            notes.append(f"verified at the input shape {list(shape)} given with --input-shape; the graph "
                         "accepts other sizes along its dynamic axes too")
    else:
        shape = export.sample_shape(model)
    name = model.graph.name or p.stem
    labels = cert.class_labels if cert else []
    outputs = export.output_size(model)
    return Source(p, digest, "onnx", model, cert.architecture if cert and cert.architecture else f"onnx:{name}",
                  shape, labels, None, num_outputs=outputs or (len(labels) or None),
                  feature_names=_json_list(meta.get(FEATURE_NAMES_KEY)), notes=notes)


def _json_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _certificate_or_none(meta: dict[str, str]) -> certificate.Certificate | None:
    try:
        return certificate.read(meta)
    except ValueError:
        return None


def input_sets(source: Source, config: Config, notes: list[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """The inputs to verify on: random N(0, 1) samples, plus real validation samples if a data set is known.

    Data the user named (``config.data``) must load; the checkpoint's own data set is skipped with
    a note in ``notes`` if it cannot be loaded (a data file that is neither where training read it,
    nor beside the checkpoint where it was then, nor at the path as given, relative to here).
    """
    sets = [("random", export.random_inputs(source.input_shape, config.n_random, seed=config.seed))]
    if config.data:
        sets.append(_validation_set(config.data, source, config, explicit=True))
    elif config.use_data and source.dataset:
        found = own_data(source)
        try:
            if found is None:
                tried = ", ".join(repr(c) for c in source.data_paths) or repr(source.dataset)
                raise BnfoldError(f"it is not at {tried}")
            sets.append(_validation_set(found, source, config, explicit=False))
        except (BnfoldError, OSError) as exc:
            if notes is not None:
                notes.append(f"verified on random inputs only: the checkpoint's data set {source.dataset!r} "
                             f"did not load ({' '.join(str(exc).split())}); pass --data PATH to verify on it")
    return sets


def own_data(source: Source) -> str | None:
    """The checkpoint's own data set: its bundled name, or the first of its recorded paths that exists."""
    from bnfold.data import BUNDLED

    if not source.dataset:
        return None
    if source.dataset in BUNDLED:
        return source.dataset
    return next((c for c in source.data_paths if Path(c).exists()), None)


def _validation_set(name: str, source: Source, config: Config, *, explicit: bool) -> tuple[str, np.ndarray]:
    data = load_split(name, source, explicit=explicit)
    label = source.dataset if not explicit and source.dataset else data.name
    return f"{label} validation", data.X_val[: config.max_data]


def load_split(name: str, source: Source, *, explicit: bool) -> Dataset:
    """Data set ``name`` (bundled, or a path) split as training split it, samples in the model's input shape.

    Raises :class:`BnfoldError` if it does not load or its samples do not fit the model (a data set
    the user named must have the model's sample shape; the checkpoint's own may differ by a reshape).
    """
    from bnfold.data import BUNDLED, load_dataset

    arch = source.architecture if source.kind == "checkpoint" else None
    try:
        from bnfold.archs import get_arch

        get_arch(arch or "")
    except (ImportError, BnfoldError, KeyError, ValueError):
        arch = None  # a custom model: keep the data set's own sample layout
    options = dict(source.data_options)  # how training read it: the same split, the same label column
    where: dict[str, Any] = ({"name": name, **{k: v for k, v in options.items() if k == "val_fraction"}}
                             if name in BUNDLED else {"path": name, **options})
    data = load_dataset(**where, arch=arch, seed=source.data_seed)
    x = data.X_val
    if list(x.shape[1:]) != list(source.input_shape):
        if explicit or x[0].size != int(np.prod(source.input_shape)):
            raise BnfoldError(
                f"validation samples of {data.name} have shape {list(x.shape[1:])} "
                f"but the model expects {source.input_shape}"
            )
        data.X_train = data.X_train.reshape(data.X_train.shape[0], *source.input_shape)
        data.X_val = x.reshape(x.shape[0], *source.input_shape)
    data.X_train, data.X_val = data.X_train.astype(np.float32), data.X_val.astype(np.float32)
    return data


# ---------------------------------------------------------------------------------------------
# The pipeline


def fold_source(source: Source, example: np.ndarray) -> FoldResult[Any]:
    """``bnfold.fold`` on the loaded model; a PyTorch model is traced with ``example`` inputs."""
    if source.kind == "onnx":
        return bnfold.fold(source.model)
    import torch

    return bnfold.fold(source.model, example_inputs=torch.from_numpy(np.ascontiguousarray(example)))


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


class FoldFailed(VerificationFailed):
    """A check of :func:`fold_and_certify` failed; the attributes hold what was measured until then.

    ``fold`` is the fold account as far as it got (None if the fold itself did not finish).
    """

    def __init__(self, message: str, *, source: Source, checks: list[Check], fold: FoldResult[Any] | None,
                 notes: list[str], timings: dict[str, float], tolerance: Tolerance) -> None:
        super().__init__(message)
        self.source, self.checks, self.fold = source, checks, fold
        self.notes, self.timings, self.tolerance = notes, timings, tolerance

    def to_dict(self) -> dict[str, Any]:
        """The JSON report of a failed run: ``passed: false``, the reason and every measurement."""
        return {
            "bnfold_version": __version__,
            "passed": False,
            "failure": " ".join(str(self).split()),
            "source": _source_dict(self.source),
            "fold": None if self.fold is None else _fold_dict(self.fold, {}),
            "notes": [*self.source.notes, *self.notes],
            "checks": {c.key: {"stage": c.stage, **c.report.to_dict()} for c in self.checks},
            "tolerance": self.tolerance.to_dict(),
            "timings_s": self.timings,
        }


def fold_and_certify(source: Source, config: Config | None = None, *, status: Status = _quiet) -> Outcome:
    """Fold, verify, export, fold the export, verify it, certify ``source``; raise
    :class:`FoldFailed` (a :class:`VerificationFailed`) with every measurement so far if a check fails.

    Each verification step measures every input set before it fails. Returns the certified ONNX
    model without writing it anywhere.
    """
    config = config or Config()
    timings: dict[str, float] = {}
    notes: list[str] = []
    checks: list[Check] = []
    folds: list[FoldResult[Any]] = []
    try:
        return _fold_and_certify(source, config, status, timings, notes, checks, folds)
    except FoldFailed:
        raise
    except VerificationFailed as exc:
        raise FoldFailed(str(exc), source=source, checks=checks, fold=folds[-1] if folds else None, notes=notes,
                         timings=timings, tolerance=config.tolerance) from exc


def _fold_and_certify(source: Source, config: Config, status: Status, timings: dict[str, float], notes: list[str],
                      checks: list[Check], folds: list[FoldResult[Any]]) -> Outcome:
    with _timed(timings, "inputs"):
        sets = input_sets(source, config, notes)
    status("folding batch norms")
    with _timed(timings, "fold"):
        first = fold_source(source, sets[0][1][:2])
    folds.append(accounting.tag(first, "pytorch" if source.kind == "checkpoint" else "onnx"))
    with _timed(timings, "verify"):
        baselines = [baseline_outputs(source.model, x) for _, x in sets]  # float64, shared by every check
    exported: export.Exported | None = None
    if source.kind == "checkpoint":
        status("verifying the folded model (pytorch)")
        with _timed(timings, "verify"):
            _verify_all(checks, "pytorch", source.model, first.model, sets, baselines, config)
        status("exporting to ONNX")
        with _timed(timings, "export"):
            exported = export.export_model(first.model, source.input_shape, opset=config.opset,
                                           exporter=config.exporter, input_name=config.input_name,
                                           output_name=config.output_name)
        notes += exported.notes
        status("folding batch norms in the exported graph")
        with _timed(timings, "fold_onnx"):
            second = bnfold.fold(exported.model)
            result = accounting.combine(first, second, exported.modules)
            export.check(result.model, what="the exported model after the ONNX fold")
        stages = {"pytorch": first.counts, "onnx": second.counts}
    else:
        result = accounting.tag(first, "onnx")
        with _timed(timings, "export"):
            export.check(result.model, what="the folded ONNX model")
        stages = {"onnx": first.counts}
    folds.append(result)
    proto = result.model
    accounting.check_against(result, proto)
    status("verifying the final ONNX graph (onnxruntime)")
    with _timed(timings, "verify_onnx" if source.kind == "checkpoint" else "verify"):
        names = ("original", "onnx") if source.kind == "checkpoint" else ("original", "folded")
        _verify_all(checks, "onnxruntime", source.model, proto, sets, baselines, config, names=names)
    status("writing and checking the certificate")
    with _timed(timings, "certify"):
        _describe(proto, source)
        cert, selftest = _certify(proto, source, result, checks, sets, config, exported)
        proto = onnx.load_from_string(proto.SerializeToString())  # what gets written
    return Outcome(source, result, checks, proto, cert, selftest, timings, notes=[*source.notes, *notes],
                   stages=stages, exported=exported, requested_opset=config.opset if exported is not None else None)


def _verify_all(checks: list[Check], stage: str, original: Any, candidate: Any, sets: list[tuple[str, np.ndarray]],
                baselines: list[Any], config: Config, *, names: tuple[str, str] = ("original", "folded")) -> None:
    """Verify ``candidate`` against ``original`` on every input set, then raise on the first failure."""
    reports = []
    for (label, x), base in zip(sets, baselines, strict=True):
        rep = verify(original, candidate, x, tolerance=config.tolerance, inputs_label=label, names=names,
                     baseline=base)
        checks.append(Check(stage, rep))
        reports.append(rep)
    for rep in reports:
        rep.raise_if_failed()


FEATURE_NAMES_KEY = "bnfold.feature_names"  # JSON list: the input features of a tabular model, in order
CLASS_LABELS_KEY = "bnfold.class_labels"  # JSON list: the label of each output, in order
INPUT_SHAPE_KEY = "bnfold.input_shape"  # JSON list: one sample's shape, without the batch axis


def _describe(proto: onnx.ModelProto, source: Source) -> None:
    """What a client needs to build a request, as plain metadata entries beside the certificate."""
    entries: dict[str, list[Any]] = {INPUT_SHAPE_KEY: list(source.input_shape)}
    if source.class_labels:
        entries[CLASS_LABELS_KEY] = list(source.class_labels)
    if source.feature_names:
        entries[FEATURE_NAMES_KEY] = list(source.feature_names)
    props = proto.metadata_props
    for i in reversed(range(len(props))):
        if props[i].key in (FEATURE_NAMES_KEY, CLASS_LABELS_KEY, INPUT_SHAPE_KEY):
            del props[i]
    for key, value in entries.items():
        entry = props.add()
        entry.key, entry.value = key, json.dumps(value)


def _certify(proto: onnx.ModelProto, source: Source, result: FoldResult[Any], checks: list[Check],
             sets: list[tuple[str, np.ndarray]], config: Config,
             exported: export.Exported | None) -> tuple[certificate.Certificate, Comparison]:
    x = sets[-1][1][: config.selftest_samples]  # real samples when there are some
    input_name = export.graph_input(proto)[0]
    cert = certificate.Certificate(
        input_name=input_name,
        output_name=proto.graph.output[0].name,
        selftest_input=x,
        selftest_output=ort_runner(proto)(x),
        tolerance=config.tolerance,
        bnfold_version=__version__,
        source_sha256=source.sha256,
        architecture=source.architecture,
        input_shape=list(source.input_shape),
        class_labels=list(source.class_labels),
        folded=result.counts["folded"],
        kept=result.counts["kept"],
        errors={c.key: _error_summary(c.report) for c in checks},
        batchnorm_nodes=len(export.batchnorm_nodes(proto)),
        opset=export.opset_of(proto),
        exporter=exported.exporter if exported is not None else "",
    )
    certificate.attach(proto, cert)
    # Re-read the certificate from the serialized bytes and re-check it, and its self-test, on them.
    written = onnx.load_from_string(proto.SerializeToString())
    again = certificate.read({e.key: e.value for e in written.metadata_props})
    if again is None:
        raise VerificationFailed("the certificate did not survive serialization")
    accounting.check_against(result, written)
    measured = (len(export.batchnorm_nodes(written)), export.opset_of(written))
    if (again.folded, again.kept) != (len(result.folded), len(result.skipped)) or \
            (again.batchnorm_nodes, again.opset) != measured or again.kept < measured[0]:
        raise VerificationFailed(
            f"the certificate disagrees with the graph it is written into: it says {again.folded} folded, "
            f"{again.kept} kept, {again.batchnorm_nodes} BatchNormalization nodes, opset {again.opset}; the fold "
            f"report says {len(result.folded)} folded, {len(result.skipped)} kept, and the graph has "
            f"{measured[0]} BatchNormalization nodes, opset {measured[1]}"
        )
    selftest = again.check(ort_runner(written))
    if not selftest.passed:
        raise VerificationFailed(
            f"the certificate's self-test does not reproduce: max abs error {selftest.max_abs:.3g} "
            f"> allowed {selftest.allowed:.3g}"
        )
    return cert, selftest


def _error_summary(rep: VerifyReport) -> dict[str, Any]:
    return {
        "reference": rep.reference, "n_samples": rep.n_samples, "max_abs_error": rep.max_abs_error,
        "max_rel_error": rep.max_rel_error, "allowed": rep.allowed, "top1_agreement": rep.top1_agreement,
        "baseline_max_abs_error": next((r.max_abs_error for r in rep.rows if not r.gating), None),
    }


def check_destinations(*, output: str | Path | None = None, repository_dir: str | Path | None = None,
                       name: str | None = None, report: str | Path | None = None,
                       inputs: tuple[str | Path, ...] = ()) -> None:
    """Fail early (before any work) on destinations that cannot be written.

    Each file destination must be in an existing directory that takes a new file (tried by
    creating and removing a temporary file there), the repository's nearest existing directory
    likewise; no destination may be one of ``inputs`` or another destination (same file, also
    through a symlink or another relative path).
    """
    if output is None and repository_dir is None:
        raise BnfoldError("nothing to write: give an output file (-o OUT.onnx) or --repository DIR --name NAME")
    if (repository_dir is None) != (name is None):
        raise BnfoldError("--repository and --name go together: the model is written to DIR/NAME/<version>/model.onnx")
    if name is not None:
        repository.check_name(name)
    files = [(label, Path(p)) for label, p in (("output", output), ("report", report)) if p is not None]
    for label, target in files:
        for other in inputs:
            if _same_file(target, Path(other)):
                raise BnfoldError(f"{label} {str(target)!r} is the input file {str(other)!r}; write to another file")
    if len(files) == 2 and _same_file(files[0][1], files[1][1]):
        raise BnfoldError(f"the output and the report are the same file {str(files[0][1])!r}")
    for label, target in files:
        atomic.check_writable(target, label)
    if repository_dir is not None and name is not None:
        if Path(repository_dir).exists() and not Path(repository_dir).is_dir():
            raise BnfoldError(f"repository {str(repository_dir)!r} exists and is not a directory")
        repository.check_writable(repository_dir, name)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def write(outcome: Outcome, *, output: str | Path | None = None, repository_dir: str | Path | None = None,
          name: str | None = None, report: str | Path | None = None) -> list[str]:
    """Write the certified model (file and/or new repository version) and the JSON report.

    Every file is staged first and put in place only when all of them were written
    (:class:`bnfold.atomic.Writes`). The report lists the files written.
    """
    start = time.perf_counter()
    data = outcome.onnx_model.SerializeToString()
    with atomic.Writes() as writes:
        expected: list[str] = []
        if output is not None:
            writes.bytes(output, data, "output")
            expected.append(str(output))
        if repository_dir is not None and name is not None:
            writes.add(*repository.stage(repository_dir, name, data))
            expected.append(str(repository.model_path(repository_dir, name,
                                                      repository.next_version(repository_dir, name))))
        if report is not None:
            outcome.written = [*expected, str(report)]
            outcome.timings["write"] = time.perf_counter() - start
            writes.bytes(report, _json(outcome.to_dict()), "report")
        outcome.written = writes.commit()
    if report is not None and outcome.written[:-1] != expected:  # another writer took the version meanwhile
        atomic.write_bytes(report, _json(outcome.to_dict()), "report")
    outcome.timings.setdefault("write", time.perf_counter() - start)
    return outcome.written


def _json(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, indent=2) + "\n").encode()


def run(path: str | Path, *, output: str | Path | None = None, repository_dir: str | Path | None = None,
        name: str | None = None, report: str | Path | None = None, options: LoadOptions | None = None,
        config: Config | None = None, quantize: QuantizeOptions | None = None, status: Status = _quiet) -> Outcome:
    """``bnfold fold``: load ``path``, fold, verify, export, certify, then write (only if all passed).

    With ``quantize``, the certified float model is then quantized and checked against its own
    contract (:mod:`bnfold.quantize`), and the int8 model is what is written; its calibration data
    is loaded and checked before any folding. If a check fails, nothing but the report is written:
    it says ``passed: false``, why, and every measurement made (:class:`FoldFailed`, which is then raised).
    """
    check_destinations(output=output, repository_dir=repository_dir, name=name, report=report, inputs=(path,))
    status(f"loading {path}")
    start = time.perf_counter()
    source = load_source(path, options)
    calibration = None
    if quantize is not None:
        from bnfold.quantize import calibration_for, quantize_outcome

        calibration = calibration_for(source, config or Config(), quantize)
    load_s = time.perf_counter() - start
    try:
        outcome = fold_and_certify(source, config, status=status)
        if quantize is not None and calibration is not None:
            outcome = quantize_outcome(outcome, calibration, quantize, status=status)
    except FoldFailed as exc:
        exc.timings = {"load": load_s, **exc.timings}
        if report is not None:
            body = {**exc.to_dict(), "written": [str(report)]}
            atomic.write_bytes(report, _json(body), "report")
        raise
    outcome.timings = {"load": load_s, **outcome.timings}
    status("writing")
    write(outcome, output=output, repository_dir=repository_dir, name=name, report=report)
    return outcome


# ---------------------------------------------------------------------------------------------
# inspect / verify


@dataclass
class Inspection:
    """What ``bnfold inspect`` shows: the model, its layers and its fold plan (nothing written)."""

    source: Source
    layer_counts: dict[str, int]  # leaf module types (PyTorch) or op types (ONNX)
    parameters: int
    fold: FoldResult[Any]
    certificate: certificate.Certificate | None = None
    opset: int | None = None
    selftest: Comparison | None = None  # the certificate's self-test re-run in onnxruntime
    batchnorm_nodes: int | None = None  # BatchNormalization nodes of an ONNX file

    def to_dict(self) -> dict[str, Any]:
        return {
            **_source_dict(self.source),
            "layers": self.layer_counts, "parameters": self.parameters, "opset": self.opset,
            "batchnorm_nodes": self.batchnorm_nodes,
            "fold_plan": [{"bn": bn, "status": s, "detail": d} for bn, s, d in self.fold.rows()],
            "notes": list(self.fold.notes),
            "certificate": None if self.certificate is None else json.loads(self.certificate.to_json()),
            "selftest": None if self.selftest is None else {
                "max_abs_error": self.selftest.max_abs, "allowed": self.selftest.allowed,
                "passed": self.selftest.passed},
        }


def inspect_file(path: str | Path, options: LoadOptions | None = None) -> Inspection:
    """Load ``path`` and plan the fold on a copy (``bnfold.fold`` never modifies its input)."""
    source = load_source(path, options)
    result = fold_source(source, export.random_inputs(source.input_shape, 2))
    if source.kind == "onnx":
        proto = source.model
        params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
        meta = {e.key: e.value for e in proto.metadata_props}
        cert = _certificate_or_none(meta)
        selftest = None if cert is None else cert.check(ort_runner(proto))
        return Inspection(source, export.op_counts(proto), params, result, cert, export.opset_of(proto), selftest,
                          len(export.batchnorm_nodes(proto)))
    model = source.model
    leaves = [type(m).__name__ for m in model.modules() if next(m.children(), None) is None]
    params = sum(p.numel() for p in model.parameters())
    return Inspection(source, dict(Counter(leaves).most_common()), int(params), result)


def compare_files(a: str | Path, b: str | Path, *, options: LoadOptions | None = None,
                  config: Config | None = None) -> list[VerifyReport]:
    """``bnfold verify A B``: run both on random (and validation) inputs; A is the reference."""
    config = config or Config()
    first, second = load_source(a, options), load_source(b, options)
    if first.input_shape != second.input_shape:
        raise BnfoldError(f"{a} takes inputs of shape {first.input_shape} but {b} takes {second.input_shape}")
    if second.dataset and not first.dataset:
        first.dataset = second.dataset
    names = (first.path.name, second.path.name)
    if names[0] == names[1]:
        names = (str(first.path), str(second.path))
    return [
        verify(first.model, second.model, x, tolerance=config.tolerance, inputs_label=label, names=names)
        for label, x in input_sets(first, config)
    ]
