"""``python -m service``: serve with settings from ``BNFOLD_*`` environment variables."""

import sys

from pydantic import ValidationError

from service.config import describe

USAGE = """usage: python -m service

Serve the model repository over the Open Inference Protocol. Takes no arguments: configure it
with BNFOLD_* environment variables (BNFOLD_MODEL_REPOSITORY, BNFOLD_HOST, BNFOLD_PORT,
BNFOLD_API_KEY, ...; see the README's configuration table), or use `bnfold serve --help`."""

if len(sys.argv) > 1:
    print(USAGE, file=sys.stdout if sys.argv[1] in ("-h", "--help") else sys.stderr)
    raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
try:
    from service.main import run  # builds the app, reading the settings
except ValidationError as exc:  # a bad BNFOLD_* value: say which, without a traceback
    print(f"python -m service: invalid configuration\n{describe(exc)}", file=sys.stderr)
    raise SystemExit(2) from None
run()
