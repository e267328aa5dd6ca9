"""``bnfold train``: train a registry architecture and save the best checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bnfold.cli import HelpFormatter, common_parser
from bnfold.errors import BnfoldError

EPILOG = """\
examples:
  bnfold train -o digits_cnn.pt                    # cnn on the bundled digits
  bnfold train --arch resnet --plot curves.png -o resnet.pt
  bnfold train --arch mlp --dataset breast-cancer -o mlp.pt
  bnfold train --arch cnn --norm none -o no_bn.pt  # the same without batch norm
  bnfold train --arch mlp --data table.csv --label-column species -o mlp.pt
  bnfold train --arch cnn --data images/ --image-size 32 -o cnn.pt
                                         # images/: one sub-folder per class
  bnfold train --width 32 --epochs 20 --lr 1e-3 --optimizer sgd -o cnn.pt
  bnfold train --nproc 2 --batch-size 64 -o cnn.pt
                                         # 2 processes, 32 samples each per step
  torchrun --nproc-per-node 4 -m bnfold train --device cuda -o cnn.pt
  bnfold train --resume cnn.pt --epochs 30 -o cnn30.pt
                                         # continue from its saved epoch

Ctrl-C stops early and saves the best epoch so far. --batch-size is the global
batch: each of N processes takes batch-size / N samples per step.
"""


# Spelled out (not imported from bnfold.archs / bnfold.data) so `bnfold --help` does not import torch;
# tests/cli/test_train_cli.py checks they match the registry.
ARCH_NAMES = ("mlp", "cnn", "resnet", "mobilenet", "conv1d")
DATASET_NAMES = ("digits", "breast-cancer")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EPILOG,
        help="train a model (cnn, resnet, mobilenet, mlp, conv1d) and save a checkpoint",
        description="Train an architecture from the registry on a bundled data set or your own data and save "
        "the best epoch (by validation accuracy) as a checkpoint. Unset hyper-parameters use the "
        "architecture's defaults; without --dataset/--data each architecture trains on its reference "
        "data set (digits; breast-cancer for mlp).",
    )
    p.add_argument("-o", "--output", required=True, metavar="CHECKPOINT", help="checkpoint file to write (.pt)")
    p.add_argument("--arch", default="cnn", choices=ARCH_NAMES, help="architecture")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=DATASET_NAMES, help="bundled data set")
    src.add_argument("--data", metavar="PATH", help=".npz (X, y), .csv, or a folder with one sub-folder per class")
    p.add_argument("--label-column", metavar="NAME", help="CSV label column (default: label)")
    p.add_argument("--image-size", type=int, metavar="N", help="image folders: resize to N x N (default: 32)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs (default: per architecture)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="global batch size, split evenly among the processes (default: per architecture)")
    p.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default: per architecture)")
    p.add_argument("--weight-decay", type=float, metavar="X", help="weight decay (default: per architecture)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="AdamW or SGD with momentum")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, split and batch order")
    p.add_argument("--norm", default="bn", choices=["bn", "none"], help="train with or without batch norm")
    p.add_argument("--val-fraction", type=float, default=0.2, help="stratified validation split")
    p.add_argument("--width", type=int, metavar="N", help="channels / hidden units of the first stage")
    p.add_argument("--depth", type=int, metavar="N", help="number of stages (blocks for mlp)")
    p.add_argument("--arch-config", metavar="JSON", help='further architecture options, e.g. \'{"expansion": 6}\'')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (cuda: GPU LOCAL_RANK under torchrun)")
    p.add_argument("--amp", action="store_true", help="CUDA mixed precision (float16 autocast, gradient scaling)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train in N data-parallel processes on this machine (runs torchrun for you)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="normalize with the statistics of the global batch (default: on with more than one process)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="a rank waiting longer than this for the others fails the run")
    p.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue training from this checkpoint's saved epoch (same options it was trained with)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads (0: torch's default); these small models train fastest on one")
    p.add_argument("--plot", metavar="PNG", help="write loss/accuracy curves (train vs validation)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output (one line per epoch otherwise)")
    p.set_defaults(func=run, parser=p)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from bnfold import distributed
    from bnfold.cli.layout import console, emit, wrap
    from bnfold.train import TrainConfig, train

    if args.nproc is not None:
        if distributed.launched():
            raise BnfoldError("--nproc starts the processes itself; under torchrun leave it out")
        return distributed.launch(args.nproc, ["train", *_argv(args, drop={"nproc"})])
    config = TrainConfig(
        arch=args.arch, dataset=args.dataset, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed, norm=args.norm,
        val_fraction=args.val_fraction, label_column=args.label_column, image_size=args.image_size,
        device=args.device, threads=args.threads or None, arch_config=_arch_config(args),
        sync_bn=args.sync_bn, amp=args.amp, resume=args.resume, dist_timeout_s=args.dist_timeout,
    )
    try:
        result = train(config, output=args.output, plot=args.plot, progress=not args.quiet)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # every rank got the signal; rank 0 says it, once
            print("bnfold: interrupted before the first epoch finished; nothing was saved", file=sys.stderr)
        return 130
    except BnfoldError as exc:
        # Every rank checks the same options and agrees on the rest; rank 0 says what is wrong, once.
        # A failed collective is each rank's own news: every rank reports it.
        if os.environ.get("RANK", "0") != "0" and not isinstance(exc, distributed.CollectiveFailed):
            return exc.exit_code
        raise
    if result.rank != 0:
        return 0  # rank 0 reports
    best = result.history[result.best_epoch - 1]
    out = console()
    ran = f"{len(result.history)}" + (f" run, {result.epochs} planned" if result.interrupted else "")
    where = f" on {result.world_size} processes ({result.backend})" if result.world_size > 1 else ""
    lines = wrap(
        f"saved {args.output}: {result.arch} on {result.dataset_name}, best epoch {result.best_epoch} of {ran} "
        f"(val accuracy {best['val_accuracy']:.4f}, val loss {best['val_loss']:.4f}), {result.seconds:.1f} s{where}",
        out.width)
    lines += wrap(f"sha256 {result.checkpoint_sha256}", out.width, indent=2)
    if args.plot:
        lines += wrap(f"saved {args.plot} (the saved epoch is marked)", out.width)
    emit(out, lines)
    if result.interrupted:
        print(f"bnfold: interrupted after epoch {len(result.history)} of {result.epochs}; {args.output} holds the "
              f"best epoch so far ({result.best_epoch})", file=sys.stderr)
        return 130
    return 0


def _arch_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.arch_config:
        try:
            config = json.loads(args.arch_config)
        except json.JSONDecodeError as exc:
            raise BnfoldError(f"--arch-config is not valid JSON ({exc.msg}): {args.arch_config!r}") from None
        if not isinstance(config, dict):
            raise BnfoldError(f"--arch-config must be a JSON object, got {args.arch_config!r}")
    for key in ("width", "depth"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config



def _argv(args: argparse.Namespace, *, drop: set[str]) -> list[str]:
    """The command line that parses to ``args`` (options left at their defaults omitted), minus ``drop``."""
    argv: list[str] = []
    for action in args.parser._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:  # store_true
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], str(value)]
    return argv
