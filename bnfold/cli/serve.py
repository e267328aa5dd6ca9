"""``bnfold serve``: run the inference service over a model repository (thin: flags -> settings -> run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    from bnfold.cli import HelpFormatter, common_parser

    parser = sub.add_parser(
        "serve", parents=[common_parser()], formatter_class=HelpFormatter,
        help="serve ONNX models over REST (Open Inference Protocol)",
        description="Serve every DIR/<name>/<version>/model.onnx with onnxruntime over the Open Inference "
                    "Protocol (KServe v2 / Triton HTTP; gRPC too with --grpc-port), a v1 ':predict' endpoint and "
                    "Prometheus /metrics. "
                    "Certified models serve only after their self-test reproduces in this runtime. A missing "
                    "repository, or one without any model, is refused at start (exit code 2), except that "
                    "--model-control poll may start on an empty one and serve models as they are written. "
                    "Unset flags fall back to BNFOLD_* environment variables; the other settings "
                    "(BNFOLD_API_KEY, BNFOLD_MAX_BATCH_SIZE, ...) are listed in service/config.py.",
        epilog="examples:\n"
               "  bnfold serve --model-repository models\n"
               "  bnfold serve --model-repository models --host 0.0.0.0 --port 8080 --workers 2\n"
               "  bnfold serve --model-repository models --grpc-port 8001\n"
               "  bnfold serve --model-repository models --model-control poll\n"
               "  BNFOLD_API_KEY=secret bnfold serve --model-repository models\n"
               "  curl localhost:8000/v2/health/ready",
    )
    unset = argparse.SUPPRESS  # unset flags leave the environment / settings default in force
    parser.add_argument("--model-repository", metavar="DIR", default=unset,
                        help="model repository (default: $BNFOLD_MODEL_REPOSITORY or ./models)")
    parser.add_argument("--host", default=unset, help="bind address (default: $BNFOLD_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=unset, help="TCP port (default: $BNFOLD_PORT or 8000)")
    parser.add_argument("--grpc-port", type=int, metavar="PORT", default=unset,
                        help="also serve the Open Inference Protocol over gRPC on this port (needs the grpc "
                             "extra; default: $BNFOLD_GRPC_PORT, unset = no gRPC)")
    parser.add_argument("--model-control", choices=["none", "explicit", "poll"], default=unset,
                        help="none: the models found at start; explicit: the /v2/repository load and unload "
                             "calls; poll: follow the repository as versions are written and removed "
                             "(default: $BNFOLD_MODEL_CONTROL or none)")
    parser.add_argument("--repository-poll-s", type=float, metavar="SECONDS", default=unset,
                        help="poll mode: seconds between scans (default: $BNFOLD_REPOSITORY_POLL_S or 5)")
    parser.add_argument("--workers", type=int, default=unset,
                        help="worker processes, each loading every model (default: $BNFOLD_WORKERS or 1)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=unset,
                        help="log level (default: $BNFOLD_LOG_LEVEL or info)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.main import run as serve

    names = ("model_repository", "host", "port", "grpc_port", "model_control", "repository_poll_s", "workers",
             "log_level")
    settings = Settings(**{name: getattr(args, name) for name in names if hasattr(args, name)})
    check_repository(settings.model_repository, may_be_empty=settings.model_control == "poll")
    if settings.grpc_port is not None:
        check_grpc()
    serve(settings)
    return 0


def check_repository(root: Path, *, may_be_empty: bool = False) -> None:
    """Refuse (exit 2, one line) a repository that is missing or holds no model, as Triton does by
    default, instead of a server that runs forever answering 503 on readiness. ``may_be_empty``
    (poll mode, where models arrive later) still refuses a missing one or a file."""
    from bnfold.errors import BnfoldError
    from bnfold.repository import MODEL_FILE

    if not root.exists():
        raise BnfoldError(f"model repository {str(root)!r} does not exist (--model-repository or "
                          "$BNFOLD_MODEL_REPOSITORY)")
    if not root.is_dir():
        raise BnfoldError(f"model repository {str(root)!r} is not a directory")
    if not may_be_empty and not any(v.name.isdigit() and (v / MODEL_FILE).is_file()
               for m in root.iterdir() if m.is_dir() and not m.name.startswith(".") for v in m.iterdir()):
        raise BnfoldError(f"model repository {str(root)!r} holds no model: expected {root}/<name>/<version>/"
                          f"{MODEL_FILE} (bnfold fold MODEL --repository {root} --name NAME writes one)")


def check_grpc() -> None:
    """Refuse (exit 2, one line) a gRPC port when the grpc extra is not installed, before anything loads."""
    from bnfold.errors import BnfoldError

    try:
        import grpc  # noqa: F401
        from tritonclient.grpc import service_pb2_grpc  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # tritonclient.grpc raises RuntimeError without grpcio
        raise BnfoldError(f"--grpc-port (or $BNFOLD_GRPC_PORT) needs gRPC support, which is not installed "
                          f"({exc}): pip install 'bnfold[grpc]'") from None
