"""Input-file checks shared by every loader."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from bnfold.errors import BnfoldError
from bnfold.files import existing_file, sha256_file


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda d: d / "absent.pt", r"checkpoint '.*absent\.pt' does not exist", id="missing"),
        pytest.param(lambda d: d, r"is a directory, not a file, expected a \.pt file", id="directory"),
        pytest.param(lambda d: _empty(d / "e.pt"), r"is empty \(0 bytes\), expected a \.pt file", id="empty"),
    ],
)
def test_existing_file_refuses(tmp_path: Path, make: Callable[[Path], Path], match: str) -> None:
    with pytest.raises(BnfoldError, match=match):
        existing_file(make(tmp_path), "checkpoint", "a .pt file")


def test_existing_file_and_sha256(tmp_path: Path) -> None:
    p = tmp_path / "ok.bin"
    p.write_bytes(b"x" * (3 << 20))
    assert existing_file(str(p), "input") == p
    assert sha256_file(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
