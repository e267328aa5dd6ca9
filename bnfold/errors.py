"""The project's one exception type, for errors a user can act on.

Library code raises :class:`BnfoldError` (or ``ValueError``/``TypeError``) with a message that
names the actual values; only the CLI turns it into an exit code, and only the service into an
HTTP status.
"""

from __future__ import annotations


class BnfoldError(ValueError):
    """A problem with the user's input (file, model, data, arguments). ``exit_code`` is for the CLI."""

    exit_code: int = 2


class VerificationFailed(BnfoldError):
    """The rewritten model does not match the original within the tolerance."""

    exit_code = 1
