"""Reading the user's input files: one set of checks and messages for every kind of input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bnfold.errors import BnfoldError


def existing_file(path: str | os.PathLike[str], what: str, expected: str = "") -> Path:
    """``path`` as a :class:`Path` if it is an existing, non-empty regular file.

    ``what`` names the input in messages ("checkpoint", "input"); ``expected`` says what a valid
    one is (e.g. "a checkpoint (.pt) or an ONNX file (.onnx)"). Raises :class:`BnfoldError`.
    """
    p = Path(path)
    hint = f", expected {expected}" if expected else ""
    if not p.exists():
        raise BnfoldError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise BnfoldError(f"{what} {str(p)!r} is a directory, not a file{hint}")
    if p.stat().st_size == 0:
        raise BnfoldError(f"{what} {str(p)!r} is empty (0 bytes){hint}")
    return p


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
