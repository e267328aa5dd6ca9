"""Train a registry architecture on a data set; keep the best epoch by validation accuracy.

The loop reads top to bottom: load and split the data, fit ``InputNorm`` to the training
split's per-channel mean/std, build the model, then for each epoch one pass over a seeded
permutation of the training split (AdamW or SGD with momentum, cosine learning-rate schedule
stepped per batch) followed by a validation pass. The state (weights and batch-norm running
statistics) of the epoch with the highest validation accuracy is kept (ties: the lower
validation loss) and is what :func:`train` returns and saves.

Ctrl-C ends training early: the best epoch so far is what :func:`train` returns and saves
(:attr:`TrainResult.interrupted` says so); an interrupt before the first epoch ends saves nothing.

Reproducibility: with ``device="cpu"`` the same config and seed give the same weights
(``torch.manual_seed`` for initialization and dropout; the batch order of epoch ``e`` is the
permutation :class:`~torch.utils.data.DistributedSampler` draws from ``seed + e``; no data-loader
workers). Training uses one CPU thread by default: these models are small, and extra intra-op
threads slow down badly when other processes share the cores.

Data-parallel runs (``torchrun --nproc-per-node N -m bnfold train``, see :mod:`bnfold.distributed`):
the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` and ``batch_size`` is
the *global* batch: each of the ``W`` processes takes ``batch_size / W`` samples of every step
(``W`` must divide it), so a step sees the same samples as one process running the same config,
and the learning rate and schedule mean the same for any ``W``. The sampler pads the epoch to a
multiple of ``W`` by repeating its first samples (at most ``W - 1`` of them). With ``sync_bn`` (on
by default when ``W > 1``) batch norm normalizes with, and accumulates running statistics from,
the global batch (:mod:`bnfold.sync_batchnorm`); the saved checkpoint has plain batch norms.
Train and validation metrics are sums and counts reduced over the ranks; each rank validates on
every ``W``-th validation sample. Only rank 0 prints and writes.

Resume (``resume=CHECKPOINT``): the checkpoint holds the state of its saved (best) epoch: weights,
optimizer, learning-rate schedule, the epoch and the torch random generator; training continues
from that epoch to ``epochs`` (the cosine schedule is stretched to the new total if it changed).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from bnfold import distributed, sync_batchnorm
from bnfold.archs import build_model, get_arch, resolve_config
from bnfold.atomic import Writes, check_writable
from bnfold.data import Dataset, load_dataset
from bnfold.distributed import Context
from bnfold.errors import BnfoldError
from bnfold.files import sha256_file
from bnfold.layers import InputNorm

OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    arch: str = "cnn"  # a bnfold.archs.ARCHITECTURES name
    dataset: str | None = None  # bundled data set; None with data=None means the arch's reference set
    data: str | Path | None = None  # path to .npz / .csv / image folder (instead of dataset)
    epochs: int | None = None  # None: the arch's default (ArchSpec.train)
    batch_size: int | None = None  # None: the arch's default
    lr: float | None = None  # peak learning rate; None: the arch's default
    weight_decay: float | None = None  # None: the arch's default
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    seed: int = 0  # initialization, split and batch order
    norm: str = "bn"  # bn | none: train with or without batch norm
    val_fraction: float = 0.2  # stratified validation split
    label_column: str | None = None  # CSV label column (default "label")
    image_size: int | None = None  # image folders: resize to this square size (default 32)
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = 1  # CPU threads during training (None: torch's default); see train()
    arch_config: dict[str, Any] = field(default_factory=dict)  # width, depth, ... (see bnfold.archs)
    sync_bn: bool | None = None  # synchronized batch norm; None: on when the world size is > 1
    amp: bool = False  # CUDA mixed precision (float16 autocast + gradient scaling)
    resume: str | Path | None = None  # continue from this checkpoint's saved epoch
    dist_timeout_s: float = distributed.DEFAULT_TIMEOUT_S  # longest wait in a collective before failing


@dataclass
class TrainResult:
    model: nn.Module  # best epoch's weights, eval mode, on the CPU
    arch: str
    arch_config: dict[str, Any]  # resolved, including "norm"
    dataset: Dataset
    history: list[dict[str, float]]  # per epoch: train/val loss and accuracy, lr, seconds
    best_epoch: int  # 1-based
    best_val_accuracy: float
    seconds: float
    config: TrainConfig
    input_norm: dict[str, list[float]]  # {"mean": [...], "std": [...]} per input channel
    checkpoint_sha256: str | None = None  # set when saved
    epochs: int = 0  # epochs planned (len(history) is how many ran)
    interrupted: bool = False  # Ctrl-C ended training after len(history) epochs
    world_size: int = 1  # processes that trained it
    backend: str = ""  # gloo | nccl | "" (one process)
    sync_bn: bool = False  # batch norm synchronized over the processes
    resume_state: dict[str, Any] | None = None  # the saved epoch's optimizer/schedule/RNG state (rank 0)
    rank: int = 0  # this process's rank (only rank 0 saves)

    @property
    def dataset_name(self) -> str:
        return self.dataset.name


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise BnfoldError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BnfoldError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def train(
    config: TrainConfig | None = None,
    *,
    output: str | Path | None = None,
    plot: str | Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train per ``config``; save the best checkpoint to ``output`` and curves to ``plot`` if given.

    Everything that can be wrong with the inputs (data, arch, options, and whether each output can
    be written) is checked before training, and the files are written together at the end (both
    or neither), so a failed run writes nothing. Ctrl-C saves the best epoch so far (see the
    module docstring). Under torchrun this joins the process group first and leaves it at the end;
    every rank returns the result, rank 0 alone writes the files.
    """
    config = config or TrainConfig()
    plan = _resolve(config)
    context = distributed.setup(plan.device, timeout_s=config.dist_timeout_s)
    try:
        return _train(config, plan, context, output, plot, progress)
    finally:
        distributed.teardown(context)


def _train(config: TrainConfig, plan: _Plan, context: Context, output: str | Path | None,
           plot: str | Path | None, progress: bool) -> TrainResult:
    def check_batch() -> None:
        if plan.batch_size % context.world_size:
            raise BnfoldError(f"batch size {plan.batch_size} is the global batch and must divide evenly among the "
                              f"{context.world_size} processes; give a multiple of {context.world_size}")

    _together(context, check_batch)
    targets = [(what, Path(t)) for what, t in (("checkpoint", output), ("plot", plot)) if t is not None]
    if len(targets) == 2 and targets[0][1].resolve() == targets[1][1].resolve():
        raise BnfoldError(f"the checkpoint and the plot are the same file {str(output)!r}")

    def check_destinations() -> None:
        if context.is_main:  # only rank 0 writes
            for what, target in targets:
                check_writable(target, what)

    _together(context, check_destinations)
    data = _together(context, lambda: load_dataset(
        plan.dataset if config.data is None else None, path=config.data, seed=config.seed,
        val_fraction=config.val_fraction, label_column=config.label_column, image_size=config.image_size,
        arch=config.arch,
    ))
    resume = None
    if config.resume is not None:
        from bnfold.checkpoint import read_resume

        resume = _together(context, lambda: read_resume(
            config.resume, arch=config.arch, arch_config={**plan.arch_config, "norm": config.norm},
            dataset=data.name, input_shape=data.input_shape, class_labels=data.class_labels,
            optimizer=config.optimizer, seed=config.seed, val_fraction=config.val_fraction, epochs=plan.epochs))
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        # These models are small: extra intra-op threads gain little and collapse when other
        # processes compete for the cores (measured on 2 shared cores: 4 s with 1 thread, 52 s with 2).
        torch.set_num_threads(config.threads)
    try:
        result = _fit(config, plan, data, progress and context.is_main, context, resume)
    finally:
        torch.set_num_threads(previous_threads)
    if context.is_main:
        with Writes() as writes:
            if output is not None:
                tmp = writes.path(output, "checkpoint")
                torch.save(result_payload(result, output), tmp)
                result.checkpoint_sha256 = sha256_file(tmp)
            if plot is not None:
                _draw(result, writes.path(plot, "plot"), title=f"{config.arch} on {data.name}")
            writes.commit()
    context.barrier(after_interrupt=result.interrupted)  # the others end once rank 0 has written (or failed to)
    return result


def _together(context: Context, work: Any) -> Any:
    """``work()`` on every rank; if it raised a :class:`BnfoldError` on any rank, raise on all of them."""
    value, error = None, None
    try:
        value = work()
    except BnfoldError as exc:
        error = exc
    context.agree(error)
    return value


@dataclass(frozen=True)
class _Plan:
    """The config with every default filled in from the architecture's registry entry."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    arch_config: dict[str, Any]
    device: torch.device
    dataset: str | None


def _resolve(config: TrainConfig) -> _Plan:
    spec = get_arch(config.arch)
    d = spec.train
    plan = _Plan(
        epochs=config.epochs if config.epochs is not None else d.epochs,
        batch_size=config.batch_size if config.batch_size is not None else d.batch_size,
        lr=config.lr if config.lr is not None else d.lr,
        weight_decay=config.weight_decay if config.weight_decay is not None else d.weight_decay,
        arch_config=resolve_config(config.arch, config.arch_config),
        device=resolve_device(config.device),
        dataset=config.dataset if config.dataset or config.data else spec.reference_dataset,
    )
    _check_options(config, plan)
    if config.amp and plan.device.type != "cuda":
        raise BnfoldError(f"--amp (mixed precision) needs --device cuda; this run trains on {plan.device.type}")
    return plan


def _fit(config: TrainConfig, plan: _Plan, data: Dataset, progress: bool, context: Context,
         resume: Any = None) -> TrainResult:
    epochs, device, world = plan.epochs, context.device, context.world_size
    batch_size = plan.batch_size // world  # per process; plan.batch_size is the global batch
    torch.manual_seed(config.seed)
    model = build_model(config.arch, input_shape=data.input_shape, num_classes=data.num_classes,
                        norm=config.norm, **plan.arch_config)
    mean, std = data.channel_stats()
    fitted = InputNorm.from_stats(mean, std)  # fixed normalization, part of the model
    model.get_submodule("input_norm").load_state_dict(fitted.state_dict())
    if resume is not None:
        from bnfold.checkpoint import load_matching_state

        load_matching_state(Path(config.resume or ""), model, resume.state_dict, config.arch)
    sync_bn = (context.distributed if config.sync_bn is None else config.sync_bn) and context.distributed
    if sync_bn:
        model = sync_batchnorm.convert(model, device)
    model.to(device)

    # C-contiguous copies: torch 2.13's CPU training kernels corrupt the heap on channels-last strided input
    x_train, y_train = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (data.X_train, data.y_train))
    x_val, y_val = (torch.from_numpy(np.ascontiguousarray(a)).to(device)[context.rank::world]
                    for a in (data.X_val, data.y_val))
    sampler: DistributedSampler[Any] = DistributedSampler(
        TensorDataset(torch.arange(len(x_train))), num_replicas=world, rank=context.rank, shuffle=True,
        seed=config.seed, drop_last=False)
    steps_per_epoch = math.ceil(sampler.num_samples / batch_size)
    optimizer = _optimizer(config.optimizer, model, plan.lr, plan.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if config.amp else None
    loss_fn = nn.CrossEntropyLoss()
    trainer: nn.Module = model
    if context.distributed:
        trainer = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    smallest = 1 if config.norm == "none" or sync_bn else 2  # a plain batch norm cannot train on one sample

    history: list[dict[str, float]] = []
    best: tuple[float, float] = (-1.0, math.inf)  # (val accuracy, val loss) of the best epoch so far
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, first_epoch = 0, 1
    resume_state: dict[str, Any] | None = None
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.scheduler)
        schedule.T_max = epochs * steps_per_epoch  # the planned total may have grown
        if scaler is not None and resume.scaler:
            scaler.load_state_dict(resume.scaler)
        torch.set_rng_state(resume.rng)
        history, best_epoch, best = list(resume.history), resume.epoch, resume.best
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        first_epoch = resume.epoch + 1
    if progress and world > 1:
        _say(f"training: {context.describe()}, global batch {plan.batch_size}"
             + (f" ({batch_size} per process), sync-bn {'on' if sync_bn else 'off'}" if world > 1 else "")
             + (f", resumed after epoch {resume.epoch}" if resume is not None else ""))
    started = time.perf_counter()
    bar = _ProgressBar(progress, epochs, steps_per_epoch)
    interrupted = False
    with bar, distributed.StopRequest(context) as stop:
        try:
            for epoch in range(first_epoch, epochs + 1):
                t0 = time.perf_counter()
                trainer.train()
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.long, device=device)
                seen, loss_sum, correct = 0, 0.0, 0
                bar.start_epoch(epoch)
                for step in range(steps_per_epoch):
                    idx = order[step * batch_size:(step + 1) * batch_size]
                    if len(idx) < smallest:
                        continue  # the same on every rank: the sampler gives each as many samples
                    xb, yb = x_train[idx], y_train[idx]
                    with torch.autocast(device.type, dtype=torch.float16, enabled=config.amp):
                        logits = trainer(xb)
                        loss = loss_fn(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        optimizer.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    schedule.step()
                    seen += len(idx)
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(1) == yb).sum())
                    bar.advance(loss_sum / seen, correct / seen)
                    if stop.agreed():  # Ctrl-C on any rank: every rank stops here, at this step
                        raise KeyboardInterrupt
                # a rank may hold no validation sample when there are fewer than ranks
                val_loss, val_acc = evaluate(model, x_val, y_val, batch_size=max(batch_size, 256)) \
                    if len(x_val) else (0.0, 0.0)
                seen_all, loss_all, correct_all, n_val, val_loss_all, val_correct_all = context.sum(
                    [seen, loss_sum, correct, len(x_val), val_loss * len(x_val), round(val_acc * len(x_val))])
                val_loss, val_acc = val_loss_all / n_val, val_correct_all / n_val
                row = {
                    "epoch": float(epoch),
                    "train_loss": loss_all / max(seen_all, 1),
                    "train_accuracy": correct_all / max(seen_all, 1),
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "seconds": time.perf_counter() - t0,
                }
                improved = (val_acc, -val_loss) > (best[0], -best[1])
                if improved:  # copy first, then swap in: an interrupt never leaves a half-updated best
                    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    saved = _resume_state(epoch, optimizer, schedule, scaler) if context.is_main else None
                    best, best_epoch, best_state, resume_state = (val_acc, val_loss), epoch, state, saved
                history.append(row)
                bar.end_epoch(row, best=improved)
                if stop.agreed():  # one noted during validation: stop with this epoch counted
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if best_epoch == 0:
                raise  # not one epoch finished: nothing worth saving
            interrupted = True
        except RuntimeError as exc:
            if not (context.distributed and distributed.collective_failure(exc)):
                raise
            raise distributed.CollectiveFailed(
                f"rank {context.rank}: training stopped in epoch {len(history) + 1}: a collective with the other "
                f"ranks failed, so another rank died or stopped answering (timeout {config.dist_timeout_s:g} s): "
                + " ".join(str(exc).split())[:200]) from None
    seconds = time.perf_counter() - started
    if resume is not None:
        seconds += resume.seconds
        if resume_state is None and context.is_main:  # no epoch beat the resumed one: keep its state
            resume_state = resume.as_payload()

    if sync_bn:
        model = sync_batchnorm.revert(model)
    model.to("cpu")
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model, arch=config.arch, arch_config={**plan.arch_config, "norm": config.norm}, dataset=data,
        history=history, best_epoch=best_epoch, best_val_accuracy=best[0],
        seconds=seconds, config=config, input_norm={"mean": mean, "std": std}, epochs=epochs,
        interrupted=interrupted, world_size=world, backend=context.backend, sync_bn=sync_bn,
        resume_state=resume_state, rank=context.rank,
    )


def _resume_state(epoch: int, optimizer: torch.optim.Optimizer, schedule: Any, scaler: Any) -> dict[str, Any]:
    """What :func:`bnfold.checkpoint.read_resume` needs to continue after ``epoch`` (CPU copies)."""
    return {
        "epoch": epoch,
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "scheduler": _cpu_copy(schedule.state_dict()),
        "scaler": _cpu_copy(scaler.state_dict()) if scaler is not None else None,
        "rng": torch.get_rng_state(),
    }


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def result_payload(result: TrainResult, output: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``result`` (see :mod:`bnfold.checkpoint`), to be saved at ``output``."""
    from bnfold.checkpoint import checkpoint_payload

    cfg = asdict(result.config)
    return checkpoint_payload(
        result.model, arch=result.arch, arch_config=result.arch_config,
        input_shape=result.dataset.input_shape, class_labels=result.dataset.class_labels,
        dataset=result.dataset.name, seed=result.config.seed, input_norm=result.input_norm,
        metrics={"history": result.history, "best_epoch": result.best_epoch,
                 "best_val_accuracy": result.best_val_accuracy, "seconds": result.seconds,
                 "epochs_planned": result.epochs or len(result.history), "interrupted": result.interrupted,
                 "world_size": result.world_size, "backend": result.backend, "sync_bn": result.sync_bn},
        train_config={k: v for k, v in cfg.items() if v is not None},
        feature_names=result.dataset.feature_names,
        data_path=result.config.data, saved_at=output, resume=result.resume_state,
    )


def save_result(result: TrainResult, output: str | Path) -> str:
    """Save ``result`` as a bnfold checkpoint (atomically); returns its sha256."""
    from bnfold.atomic import atomic_path

    with atomic_path(output, "checkpoint") as tmp:
        torch.save(result_payload(result, output), tmp)
        return sha256_file(tmp)


def plot_history(history: list[dict[str, float]], path: str | Path, *, title: str = "",
                 best_epoch: int | None = None) -> None:
    """Loss and accuracy curves, train vs validation, as a PNG (matplotlib Agg), written atomically.

    ``best_epoch`` (1-based) is marked on both panels: it is the epoch a checkpoint keeps.
    """
    from bnfold.atomic import atomic_path

    with atomic_path(path, "plot") as tmp:
        _plot(history, tmp, title=title, best_epoch=best_epoch)


def _draw(result: TrainResult, path: Path, *, title: str) -> None:
    if result.interrupted:
        title += f" (interrupted after epoch {len(result.history)} of {result.epochs})"
    _plot(result.history, path, title=title, best_epoch=result.best_epoch)


def _plot(history: list[dict[str, float]], path: Path, *, title: str, best_epoch: int | None) -> None:
    figure(history, title=title, best_epoch=best_epoch).savefig(path, format="png", dpi=100)


def figure(history: list[dict[str, float]], *, title: str = "", best_epoch: int | None = None) -> Any:
    """The matplotlib Figure :func:`plot_history` saves (for tests and notebooks)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        val = [r[f"val_{metric}"] for r in history]
        ax.plot(epochs, val, marker="o", label="validation")
        if best_epoch is not None and 1 <= best_epoch <= len(history):
            ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1)
            ax.plot([best_epoch], [val[best_epoch - 1]], marker="*", markersize=16, color="tab:red",
                    linestyle="none", label=f"saved: epoch {best_epoch}", zorder=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def _check_options(config: TrainConfig, plan: _Plan) -> None:
    if config.optimizer not in OPTIMIZERS:
        raise BnfoldError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    if config.dataset is not None and config.data is not None:
        raise BnfoldError(f"give a bundled data set ({config.dataset!r}) or a data path ({config.data!r}), not both")
    for name, value in (("epochs", plan.epochs), ("batch_size", plan.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise BnfoldError(f"{name} must be a positive integer, got {value!r}")
    if not (plan.lr > 0 and math.isfinite(plan.lr)):
        raise BnfoldError(f"lr must be a positive number, got {plan.lr!r}")
    if not (plan.weight_decay >= 0 and math.isfinite(plan.weight_decay)):
        raise BnfoldError(f"weight_decay must be >= 0, got {plan.weight_decay!r}")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise BnfoldError(f"threads must be a positive integer or None, got {config.threads!r}")


def _optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and batch-norm affine parameters (1-d tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


class _ProgressBar:
    """Training progress on stderr: one line per finished epoch, and on a terminal a bar for the
    epoch under way (cleared when training ends). Lines fit 80 columns; nothing when disabled."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self.progress: Any = None
        self.task: Any = None
        self.console: Any = None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.console import Console

            self.console = Console(stderr=True, highlight=False, soft_wrap=True)
            if self.console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.progress = Progress(
                    TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                    TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=self.console, transient=True,
                )
                self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=self.steps, metrics="")

    def advance(self, loss: float, accuracy: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, metrics=f"loss {loss:.4f} acc {accuracy:.3f}")

    def end_epoch(self, row: dict[str, float], *, best: bool) -> None:
        if self.console is None:
            return
        line = epoch_line(row, self.epochs, best=best)
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            self.console.print(line)
            self.console.file.flush()


def epoch_line(row: dict[str, float], epochs: int, *, best: bool) -> str:
    """``epoch  3/12  loss 0.1234 acc 0.970  val loss 0.0812 acc 0.975  0.4s  best`` (at most 80 columns)."""
    width = len(str(epochs))
    return (f"epoch {int(row['epoch']):>{width}}/{epochs}  loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.3f}  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}  "
            f"{row['seconds']:.1f}s" + ("  best" if best else ""))
