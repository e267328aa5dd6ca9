"""``python -m service``: serve with settings from ``BNFOLD_*`` environment variables."""

from service.main import run

run()
