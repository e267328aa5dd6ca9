"""Checkpoints: one file, readable with ``torch.load(path, weights_only=True)``, and one loader.

A bnfold checkpoint is a plain dict (no pickled code)::

    {"format": "bnfold.checkpoint", "format_version": 1,
     "arch": "cnn", "arch_config": {"width": 16, ..., "norm": "bn"},
     "state_dict": {...},                # weights and batch-norm running statistics
     "input_shape": [1, 8, 8], "class_labels": ["0", ...],
     "input_norm": {"mean": [...], "std": [...]},   # also inside the model as InputNorm
     "metrics": {"history": [...], "best_epoch": 7, ...},
     "dataset": "digits", "seed": 0, "train_config": {...},
     "feature_names": ["f1", ...],       # tabular data: the input columns, in order (else absent/None)
     "data_location": {"absolute": "/data/t.csv", "relative": "../data/t.csv"},  # user data only
     "resume": {"epoch": 7, "optimizer": {...}, "scheduler": {...}, "scaler": None, "rng": tensor},
     "bnfold_version": "...", "torch_version": "..."}

``data_location`` says where the training data was: its absolute path, and its path relative to
the checkpoint's directory (for a checkpoint moved together with its data).

``resume`` (written by ``bnfold train``) is the training state of the saved epoch: the optimizer's
and the learning-rate schedule's ``state_dict``, the gradient scaler's under ``--amp``, and the
torch random generator of rank 0. :func:`read_resume` reads it back for ``bnfold train --resume``
after checking that the checkpoint was trained with the architecture, data split and optimizer
of the run resuming it. The weights are always a plain model's: a ``DistributedDataParallel``
wrapper is unwrapped and synchronized batch norms are converted back to the batch-norm class
they replaced (:func:`bnfold.sync_batchnorm.revert`; their parameters and buffers are the same), so
a checkpoint trained on several processes folds like any other.

:func:`load_model` rebuilds the model from such a file, from a plain ``state_dict`` plus an
architecture name (and config), or from a ``state_dict`` plus the user's own factory
``"package.module:factory"`` (imported from the current directory first, as ``python -m`` does)
or ``"path/to/file.py:factory"``. Loading only ever uses ``weights_only=True``: a file whose
pickle would run code is refused, never executed.

The input shape is never guessed: it comes from ``input_shape=`` (``--input-shape``), the
architecture config, the checkpoint, or the factory's model (``model.input_shape``); a bare
``state_dict`` whose shape none of them gives is refused unless its weights fix it (an ``mlp``'s
first layer). Convolutional state_dicts fix only the channels: any spatial size fits the weights.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import pickle
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold._version import __version__
from bnfold.archs import ARCHITECTURES, build_model, get_arch
from bnfold.atomic import atomic_path
from bnfold.errors import BnfoldError
from bnfold.files import existing_file, sha256_file

FORMAT = "bnfold.checkpoint"
FORMAT_VERSION = 1
_SHOW = 3  # how many offending keys an error message lists


@dataclass
class ResumeState:
    """The training state of a checkpoint's saved epoch (see the module docstring)."""

    state_dict: dict[str, torch.Tensor]
    epoch: int  # the saved epoch (1-based); training resumes with the next one
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: torch.Tensor
    history: list[dict[str, float]]  # the epochs up to and including the saved one
    best: tuple[float, float]  # (val accuracy, val loss) of the saved epoch
    seconds: float  # training time so far

    def as_payload(self) -> dict[str, Any]:
        """The checkpoint's ``resume`` entry this state was read from."""
        return {"epoch": self.epoch, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "rng": self.rng}


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, float32, with model.input_shape
    arch: str  # registry name, the factory string, or "" if unknown
    arch_config: dict[str, Any]
    input_shape: tuple[int, ...]  # without the batch dimension
    class_labels: list[str]
    dataset: str | None  # bundled data set name when known
    meta: dict[str, Any] = field(default_factory=dict)  # metrics, seed, versions, input_norm, ...
    sha256: str = ""
    notes: list[str] = field(default_factory=list)  # what loading decided that a user should know


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_config: Mapping[str, Any],
    input_shape: tuple[int, ...] | list[int],
    class_labels: list[str],
    dataset: str | None = None,
    seed: int | None = None,
    input_norm: Mapping[str, list[float]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    feature_names: list[str] | None = None,
    data_path: str | Path | None = None,
) -> str:
    """Write a bnfold checkpoint to ``path`` atomically; returns the file's sha256 (hex).

    ``data_path``: the user's training data file or folder, stored as ``data_location``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise BnfoldError(f"output directory {str(path.parent)!r} does not exist")
    payload = checkpoint_payload(
        model, arch=arch, arch_config=arch_config, input_shape=input_shape, class_labels=class_labels,
        dataset=dataset, seed=seed, input_norm=input_norm, metrics=metrics, train_config=train_config,
        feature_names=feature_names, data_path=data_path, saved_at=path)
    with atomic_path(path, "checkpoint") as tmp:
        torch.save(payload, tmp)
        digest = sha256_file(tmp)
    return digest


def checkpoint_payload(
    model: nn.Module,
    *,
    arch: str,
    arch_config: Mapping[str, Any],
    input_shape: tuple[int, ...] | list[int],
    class_labels: list[str],
    dataset: str | None = None,
    seed: int | None = None,
    input_norm: Mapping[str, list[float]] | None = None,
    metrics: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    feature_names: list[str] | None = None,
    data_path: str | Path | None = None,
    saved_at: str | Path,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict :func:`save_checkpoint` writes (for writers that stage several files at once);
    ``saved_at`` is the checkpoint's final path, which ``data_location.relative`` is relative to.
    ``resume``: the training state to continue from (see the module docstring)."""
    model = plain_model(model)
    location = None
    if data_path is not None:
        absolute = Path(data_path).resolve()
        location = {"absolute": str(absolute),
                    "relative": os.path.relpath(absolute, Path(saved_at).resolve().parent)}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_config": dict(arch_config),
        "state_dict": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "input_shape": [int(d) for d in input_shape],
        "class_labels": [str(c) for c in class_labels],
        "input_norm": dict(input_norm) if input_norm is not None else None,
        "metrics": dict(metrics or {}),
        "dataset": dataset,
        "seed": seed,
        "train_config": dict(train_config or {}),
        "feature_names": [str(f) for f in feature_names] if feature_names else None,
        "data_location": location,
        "resume": dict(resume) if resume is not None else None,
        "bnfold_version": __version__,
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
    }
    return {k: (v if k in ("state_dict", "resume") else _plain(v, k)) for k, v in payload.items()}


def plain_model(model: nn.Module) -> nn.Module:
    """``model`` as a single process would have it: out of its ``DistributedDataParallel`` wrapper,
    synchronized batch norms converted back to plain ones (a copy; ``model`` is left as it is)."""
    from torch.nn.parallel import DistributedDataParallel

    from bnfold import sync_batchnorm

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if sync_batchnorm.is_synced(model):
        model = sync_batchnorm.revert(copy.deepcopy(model))
    return model


_RESUME_KEYS = ("arch", "arch_config", "dataset", "input_shape", "class_labels")
_RESUME_OPTIONS = ("optimizer", "seed", "val_fraction")  # from train_config


def read_resume(
    path: str | Path,
    *,
    arch: str,
    arch_config: Mapping[str, Any],
    dataset: str,
    input_shape: tuple[int, ...],
    class_labels: list[str],
    optimizer: str,
    seed: int,
    val_fraction: float,
    epochs: int,
) -> ResumeState:
    """The training state in the bnfold checkpoint ``path``, for a run with these settings.

    Raises :class:`BnfoldError` if the file is not a bnfold checkpoint with training state, if it
    was trained with another architecture (config), data set, input shape, classes, optimizer,
    seed or validation split (a different split would train on validation samples), or if it
    already holds ``epochs`` epochs or more. The weights are checked against the architecture
    when they are loaded (:func:`load_matching_state`).
    """
    path = existing_file(path, "checkpoint")
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise BnfoldError(f"{str(path)!r} is not a bnfold checkpoint, so it holds no training state to resume from; "
                          "train it with bnfold train")
    resume = obj.get("resume")
    if not isinstance(resume, Mapping):
        raise BnfoldError(f"{str(path)!r} holds no training state (optimizer, schedule): it was saved by an older "
                          "bnfold or by save_checkpoint; it folds, but cannot be resumed")
    stored_options = dict(obj.get("train_config") or {})
    here = {"arch": arch, "arch_config": dict(arch_config), "dataset": dataset, "input_shape": list(input_shape),
            "class_labels": list(class_labels), "optimizer": optimizer, "seed": seed, "val_fraction": val_fraction}
    there = {**{k: obj.get(k) for k in _RESUME_KEYS},
             **{k: stored_options.get(k, TRAIN_DEFAULTS.get(k)) for k in _RESUME_OPTIONS}}
    different = [f"{k} {there[k]!r} there, {here[k]!r} here" for k in here if _plain(here[k], k) != there[k]]
    if different:
        raise BnfoldError(f"{str(path)!r} was trained with other settings than this run: {'; '.join(different)}; "
                          "resume with the options it was trained with")
    epoch = resume.get("epoch")
    metrics = dict(obj.get("metrics") or {})
    history = list(metrics.get("history") or [])
    if not isinstance(epoch, int) or not 1 <= epoch <= len(history):
        raise BnfoldError(f"{str(path)!r}: its training state names epoch {epoch!r} of {len(history)} recorded")
    if epoch >= epochs:
        raise BnfoldError(f"{str(path)!r} already holds epoch {epoch}; give --epochs above {epoch} to train on")
    row = history[epoch - 1]
    state = obj.get("state_dict")
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise BnfoldError(f"{str(path)!r}: its state_dict is not a mapping of names to tensors")
    return ResumeState(
        state_dict=dict(state), epoch=epoch, optimizer=dict(resume["optimizer"]), scheduler=dict(resume["scheduler"]),
        scaler=resume.get("scaler"), rng=resume["rng"], history=history[:epoch],
        best=(float(row["val_accuracy"]), float(row["val_loss"])), seconds=float(metrics.get("seconds") or 0.0),
    )


# TrainConfig defaults of the options read_resume compares (a checkpoint's train_config omits None values).
TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "seed": 0, "val_fraction": 0.2}


def load_matching_state(path: Path, model: nn.Module, state: Mapping[str, Any], arch: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape (errors name them and ``path``)."""
    _load_state(path, model, state, arch)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_config: dict[str, Any] | None = None,
    model_factory: str | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
) -> LoadedModel:
    """Rebuild a model from a bnfold checkpoint or a ``state_dict`` file.

    For a bare ``state_dict`` give ``arch`` (a registry name; ``arch_config`` may carry ``width``,
    ``depth``, ``norm``, ``input_shape``, ``num_classes``) or ``model_factory``
    (``"package.module:factory"`` or ``"path/to/file.py:factory"``, called with ``arch_config``
    minus ``input_shape``). Given with a bnfold checkpoint, ``arch``/``model_factory`` override the
    stored architecture. ``input_shape`` (one sample, no batch axis) overrides every other source
    of the shape (see the module docstring); a bare state_dict without one raises
    :class:`BnfoldError` asking for it, unless the weights fix it.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    sha = sha256_file(path)
    meta: dict[str, Any] = {}
    class_labels: list[str] | None = None
    dataset: str | None = None
    stored_shape: tuple[int, ...] | None = None
    config = dict(arch_config or {})
    notes: list[str] = []

    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BnfoldError(
                f"{path}: bnfold checkpoint format version {version!r} is newer than this bnfold supports "
                f"({FORMAT_VERSION}); upgrade bnfold"
            )
        state = obj.get("state_dict")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "arch", "arch_config", "input_shape",
                                                          "class_labels", "dataset")}
        class_labels = [str(c) for c in obj.get("class_labels") or []] or None
        dataset = obj.get("dataset")
        stored_shape = tuple(int(d) for d in obj["input_shape"]) if obj.get("input_shape") else None
        if arch is None and model_factory is None:
            arch = obj.get("arch")
            config = {**dict(obj.get("arch_config") or {}), **config}
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and _is_state_dict(obj["state_dict"]):
        state = obj["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    else:
        state = obj
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        kind = type(state).__name__
        raise BnfoldError(
            f"{path}: not a bnfold checkpoint or a state_dict (found a {kind}); save model.state_dict() "
            "or use bnfold train"
        )
    if not state:
        raise BnfoldError(f"{path}: the state_dict is empty")

    given = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if given is not None and any(d < 1 for d in given):
        raise BnfoldError(f"--input-shape must be positive sizes, got {list(given)}")
    if given is not None and stored_shape is not None and given != stored_shape:
        notes.append(f"input shape {_shape(given)} from --input-shape; the checkpoint was trained on "
                     f"{_shape(stored_shape)}")
    if given is not None:
        config["input_shape"] = list(given)
    if model_factory is not None:
        model, shape = _from_factory(path, model_factory, config, stored_shape)
        arch_name = model_factory
    elif arch is not None:
        model, shape = _from_registry(path, arch, config, state, stored_shape)
        arch_name = arch
    else:
        raise BnfoldError(
            f"{path}: a bare state_dict does not say which architecture it belongs to; give --arch NAME "
            f"({', '.join(ARCHITECTURES)}) or --model package.module:factory"
        )
    _load_state(path, model, state, arch_name)
    model = model.float().eval()
    setattr(model, "input_shape", shape)  # noqa: B010 - nn.Module.__setattr__ is typed for tensors/modules
    if class_labels is None:
        class_labels = [str(i) for i in range(_num_outputs(model, shape))]
    config.pop("input_shape", None)
    return LoadedModel(model=model, arch=arch_name or "", arch_config=config, input_shape=shape,
                       class_labels=class_labels, dataset=dataset, meta=meta, sha256=sha, notes=notes)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for every way a file can be wrong."""
    path = existing_file(path, "checkpoint")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(512)
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80"
    if not is_zip and not is_pickle:
        if _looks_like_text(head):
            raise BnfoldError(f"checkpoint {str(path)!r} is a text file, not a PyTorch checkpoint")
        raise BnfoldError(f"checkpoint {str(path)!r} is not a PyTorch checkpoint (unrecognized file header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing a TorchScript archive
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = " ".join(str(exc).split())
        if "Weights only load failed" in message or "Unsupported" in message:
            culprit = _unsupported_global(message)
            raise BnfoldError(
                f"checkpoint {str(path)!r} refused: file contains pickled code{culprit} that weights_only loading "
                "will not run; re-save it as model.state_dict() or a bnfold checkpoint"
            ) from None
        raise BnfoldError(f"checkpoint {str(path)!r} is corrupted: {message[:200]}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        message = " ".join(str(exc).split())
        if "TorchScript" in message:
            raise BnfoldError(
                f"checkpoint {str(path)!r} is a TorchScript archive; bnfold needs a state_dict or a bnfold "
                "checkpoint (torch.jit.load it and torch.save its state_dict())"
            ) from None
        raise BnfoldError(
            f"checkpoint {str(path)!r} is truncated or corrupted ({size} bytes): {message[:160]}"
        ) from None


def _from_registry(path: Path, arch: str, config: dict[str, Any], state: Mapping[str, Any],
                   stored_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    spec = get_arch(arch)
    cfg = dict(config)
    norm = cfg.pop("norm", None) or ("bn" if any(k.endswith("running_mean") for k in state) else "none")
    shape_cfg = cfg.pop("input_shape", None)
    classes_cfg = cfg.pop("num_classes", None)
    shape = tuple(int(d) for d in shape_cfg) if shape_cfg else stored_shape
    if shape is None:
        shape = _input_shape_from_weights(path, arch, spec.input_rank, state)
    num_classes = int(classes_cfg) if classes_cfg else _infer_num_classes(path, state)
    return build_model(arch, input_shape=shape, num_classes=num_classes, norm=norm, **cfg), shape


def _input_shape_from_weights(path: Path, arch: str, rank: int, state: Mapping[str, Any]) -> tuple[int, ...]:
    """The input shape a bare state_dict's weights fix: all of it for an ``mlp`` (its first Linear),
    only the channels for the convolutional architectures, which pool globally and so take any
    spatial size. Then the shape must be given: a guessed size would export a model for inputs
    it was never trained on (a 3x32x32 CNN exported for 3x8x8) without a word."""
    first = state.get("features.0.weight")
    channels = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.ndim >= 2 else None
    if rank == 1 and channels is not None:
        return (channels,)
    axes = {2: "L", 3: "H,W"}.get(rank, "...")
    known = f"its first layer takes {channels} channel(s), but " if channels is not None else ""
    example = f"{channels if channels is not None else 'C'},{axes}"
    digits = " (the digits data set: --input-shape 1,8,8)" if rank == 3 and channels in (1, None) else ""
    raise BnfoldError(
        f"{path}: a bare state_dict does not record the input shape it was trained on; {known}the {arch} weights fit "
        f"any {'length' if rank == 2 else 'image size'}; give it with --input-shape {example}{digits}"
    )


def _infer_num_classes(path: Path, state: Mapping[str, Any]) -> int:
    heads = [k for k in state if k.startswith("head.") and k.endswith(".weight")]
    if not heads:
        raise BnfoldError(f"{path}: cannot infer the number of classes; give num_classes in the arch config")
    return int(state[sorted(heads)[-1]].shape[0])


def _from_factory(path: Path, spec: str, config: dict[str, Any],
                  stored_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    factory = import_factory(spec)
    cfg = dict(config)
    shape_cfg = cfg.pop("input_shape", None)
    try:
        model = factory(**cfg)
    except TypeError as exc:
        raise BnfoldError(f"model factory {spec!r} rejected the arch config {cfg}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    shape = shape_cfg or getattr(model, "input_shape", None) or stored_shape
    if not shape:
        raise BnfoldError(
            f"model factory {spec!r}: the model has no input_shape attribute; give the shape of one sample with "
            "--input-shape C,H,W (or input_shape in the arch config)"
        )
    return model, tuple(int(d) for d in shape)


def import_factory(spec: str) -> Any:
    """The callable ``spec`` names: ``"package.module:factory"``, imported with the current directory
    first on the module path (as ``python -m`` has it), or ``"path/to/file.py:factory"``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise BnfoldError(f"model factory must look like 'package.module:factory' or 'file.py:factory', got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(Path(module_name), spec)
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BnfoldError(f"cannot import {module_name!r} for model factory {spec!r} (looked in the current "
                              f"directory {cwd} and on the module path): {exc}") from None
        finally:
            if added:
                sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BnfoldError(f"{module_name!r} has no callable {attr!r} (model factory {spec!r})")
    return factory


def _import_file(file: Path, spec: str) -> Any:
    if not file.is_file():
        raise BnfoldError(f"model factory {spec!r}: {str(file)!r} is not a file")
    name = f"_bnfold_factory_{file.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise BnfoldError(f"model factory {spec!r}: cannot import {str(file)!r} as Python source")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # its own imports of modules beside it
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise BnfoldError(f"model factory {spec!r}: importing {str(file)!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(folder)
    return module


def _load_state(path: Path, model: nn.Module, state: Mapping[str, Any], arch: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        _listing(len(missing), "missing key", missing),
        _listing(len(unexpected), "unexpected key", unexpected),
        _listing(len(mismatched), "shape mismatch", mismatched),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise BnfoldError(f"{path}: state_dict does not match architecture {arch!r}: {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _listing(count: int, noun: str, items: list[str]) -> str:
    if not count:
        return ""
    shown = ", ".join(items[:_SHOW]) + (", ..." if count > _SHOW else "")
    return f"{count} {noun}{'es' if noun.endswith('ch') and count != 1 else 's' if count != 1 else ''} ({shown})"


def _num_outputs(model: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        out = model(torch.zeros((2, *shape)))
    return int(out.shape[-1])


def _plain(value: Any, where: str) -> Any:
    """Metadata as the builtin types ``weights_only`` loading accepts (numpy scalars -> Python)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return value.item()
    raise TypeError(f"checkpoint metadata {where} has a {type(value).__name__}; only builtin types can be saved")


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _unsupported_global(message: str) -> str:
    marker = "Unsupported global: GLOBAL "
    if marker in message:
        name = message.split(marker, 1)[1].split()[0]
        return f" ({name})"
    return ""
