"""What the repository on disk holds, and which of it has stopped changing.

A version is *complete* when its files' signatures (size, modification time, inode of
``model.onnx`` and of the model's ``config.json``) are the same in two scans one poll interval
apart. ``bnfold fold --repository`` renames a finished version directory into place, so its
signature never changes after it appears; a file copied in slowly changes size or mtime between
scans and waits until it settles. A copy that stalls for longer than a poll interval can still be
caught half-written: it then fails to load (or its certificate self-test fails), is reported not
ready, and is tried again once its signature changes. The previous version serves throughout.

Hidden entries (``.staging-*`` directories of bnfold, editors' temporary files) and non-integer
version directories are not versions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
MAX_VERSION_DIGITS = 18  # longer names are not versions (int() of thousands of digits raises)

FileSig = tuple[int, int, int, int] | None  # (size, mtime_ns, inode, device) or None when absent


@dataclass(frozen=True)
class Signature:
    """What a version's files look like on disk; equal signatures mean unchanged files."""

    model: FileSig
    config: FileSig


def file_signature(path: Path) -> FileSig:
    try:
        stat = path.stat()
    except OSError:  # absent, or unreadable: loading it will say why
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev


def is_version(name: str) -> bool:
    return name.isascii() and name.isdigit() and len(name) <= MAX_VERSION_DIGITS


def model_names(root: Path) -> list[str]:
    """Model directories under ``root`` (sorted, hidden ones left out). Raises ``OSError`` if unreadable."""
    return sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and e.is_dir())


def scan_model(model_dir: Path) -> dict[int, Signature]:
    """Every integer version directory of ``model_dir`` with its signature. Raises ``OSError`` if unreadable."""
    config = file_signature(model_dir / CONFIG_FILE)
    versions: dict[int, Signature] = {}
    for entry in os.scandir(model_dir):
        if entry.is_dir() and is_version(entry.name):
            versions[int(entry.name)] = Signature(file_signature(Path(entry.path) / MODEL_FILE), config)
    return dict(sorted(versions.items()))


def scan(root: Path) -> tuple[dict[str, dict[int, Signature]], set[str]]:
    """:func:`scan_model` of every model directory, and the names of those that could not be read (a
    permission or I/O error: not the same as removed). Raises ``OSError`` when ``root`` cannot be read."""
    found: dict[str, dict[int, Signature]] = {}
    unreadable: set[str] = set()
    for name in model_names(root):
        try:
            found[name] = scan_model(root / name)
        except FileNotFoundError:  # removed between the listing and the scan
            continue
        except OSError:
            unreadable.add(name)
    return found, unreadable


class Settled:
    """Remembers the previous scan; :meth:`update` keeps the versions whose signature did not change since."""

    def __init__(self) -> None:
        self._previous: dict[tuple[str, int], Signature] = {}

    def update(self, found: dict[str, dict[int, Signature]]) -> dict[str, dict[int, Signature]]:
        """The versions of ``found`` that are complete; every version of ``found`` is remembered for next time."""
        settled: dict[str, dict[int, Signature]] = {}
        current: dict[tuple[str, int], Signature] = {}
        for name, versions in found.items():
            for version, signature in versions.items():
                current[name, version] = signature
                if self._previous.get((name, version)) == signature:
                    settled.setdefault(name, {})[version] = signature
        self._previous = current
        return settled

    def unsettled(self, name: str) -> list[int]:
        """Versions of ``name`` seen in the last scan (settled or not), for the index."""
        return sorted(v for n, v in self._previous if n == name)
