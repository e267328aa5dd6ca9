"""``python -m service``: serve with settings from ``BNFOLD_*`` environment variables."""

import sys

from service.main import run

USAGE = """usage: python -m service

Serve the model repository over the Open Inference Protocol. Takes no arguments: configure it
with BNFOLD_* environment variables (BNFOLD_MODEL_REPOSITORY, BNFOLD_HOST, BNFOLD_PORT,
BNFOLD_API_KEY, ...; see the README's configuration table), or use `bnfold serve --help`."""

if len(sys.argv) > 1:
    print(USAGE, file=sys.stdout if sys.argv[1] in ("-h", "--help") else sys.stderr)
    raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
run()
