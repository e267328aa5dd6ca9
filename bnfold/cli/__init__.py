"""The ``bnfold`` command line: parse, call one library function, present the result.

Each sub-command lives in its own module ``bnfold/cli/<name>.py`` exposing ``register(sub)``
(adds its parser, with ``func=run``) and ``run(args) -> int``. Command modules import heavy
libraries inside ``run`` so ``bnfold --help`` and ``bnfold serve`` stay fast and torch-free.

Errors: a :class:`~bnfold.errors.BnfoldError` (or ``ValueError``/``OSError`` from bad input)
becomes one line on stderr and exit code 2 (1 for a failed verification); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence

from bnfold._version import __version__
from bnfold.errors import BnfoldError

# Sub-command modules, in the order `bnfold --help` lists them.
COMMANDS = ("quickstart", "train", "fold", "inspect", "verify", "bench", "serve")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep text laid out by hand (the examples) as written, wrap the rest; show each option's default
    once, where it has one.

    argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: ...)`` to every option, also
    to those whose help already names the default, to required ones and to ``None``; this one adds
    it only to an optional option with a real default that its help does not mention.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # laid out by hand (examples, lists): keep as written
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        skip = (action.required or not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action.default, bool) or "default" in text.lower())
        return text if skip else f"{text} (default: %(default)s)"


_IMPORTED = time.perf_counter()


def wall_seconds() -> float:
    """Seconds since this process started (Linux: from /proc), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def common_parser() -> argparse.ArgumentParser:
    """Options every sub-command accepts (pass as ``parents=[common_parser()]``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold",
        description="Fold batch normalization exactly, verify it, export to ONNX and serve it.",
        epilog="examples:\n  bnfold quickstart\n  bnfold fold model.pt -o model.onnx\n"
        "  bnfold serve --model-repository models",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"bnfold.cli.{name}").register(sub)
    return parser


# Commands after which the process has nothing left to do but tear down torch (see main).
FAST_EXIT = frozenset({"train", "fold", "inspect", "verify", "bench"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; ``argv=None`` (the ``bnfold`` program) reads ``sys.argv``.

    As a program, a model command ends the process with ``os._exit`` once its output is flushed:
    the interpreter's normal shutdown, tearing down torch and onnxruntime module by module, takes
    2 s more on 2 shared cores (measured after ``bnfold fold``), and every file the command
    writes is closed and renamed into place before it returns.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    code = _run(args)
    if argv is None and args.command in FAST_EXIT:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader that went away (| head)
                stream.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank is interrupted: one says so
            print("bnfold: interrupted", file=sys.stderr)
        return 130
    except BnfoldError as exc:
        return _fail(args, exc, exc.exit_code)
    except (ValueError, TypeError, OSError) as exc:
        return _fail(args, exc, 2)
    except Exception as exc:  # an internal error: still one line, but say how to get details
        return _fail(args, exc, 3, internal=True)


def _fail(args: argparse.Namespace, exc: BaseException, code: int, internal: bool = False) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    else:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if internal:
            message = f"internal error ({type(exc).__name__}): {message}; rerun with --debug and report it"
        print(f"bnfold: error: {message}", file=sys.stderr)
    return code
