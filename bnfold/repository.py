"""The model repository layout the service serves: ``DIR/NAME/<version>/model.onnx``.

Versions are positive integers; a new model gets ``max(existing) + 1``. A version directory
appears atomically: the model is written into a hidden temporary directory beside it, which is
then renamed to the version number, so a server scanning the repository never sees a partial
version, and two writers racing for the same number cannot overwrite each other (``rename``
fails on an existing non-empty directory and the loser takes the next number).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bnfold.errors import BnfoldError

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """A model name is 1-64 of ``[A-Za-z0-9_.-]``, starting with a letter or digit (it is a URL path part)."""
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"model name must be 1-64 characters of letters, digits, '_', '.', '-' starting with a letter or digit, "
            f"got {name!r}"
        )
    return name


def versions(root: str | os.PathLike[str], name: str) -> list[int]:
    """The existing versions of ``name`` (directories holding a model file), ascending."""
    model_dir = Path(root) / check_name(name)
    if not model_dir.is_dir():
        return []
    found = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file()]
    return sorted(v for v in found if v > 0)


def next_version(root: str | os.PathLike[str], name: str) -> int:
    """One more than the highest version directory of ``name`` (1 for a new model)."""
    model_dir = Path(root) / check_name(name)
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(taken, default=0) + 1


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def model_path(root: str | os.PathLike[str], name: str, version: int) -> Path:
    return Path(root) / check_name(name) / str(version) / MODEL_FILE


def check_writable(root: str | os.PathLike[str], name: str) -> None:
    """Raise :class:`BnfoldError` unless a new version of ``name`` can be published under ``root``.

    The nearest existing directory of ``root/name`` must be a directory that takes a new entry
    (a temporary directory is created there and removed), so a typo'd or read-only repository is
    refused before any work.
    """
    model_dir = Path(root) / check_name(name)
    existing = model_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BnfoldError(f"repository {str(root)!r}: {str(existing)!r} exists and is not a directory")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".staging-", dir=existing))
    except OSError as exc:
        raise BnfoldError(f"cannot write into repository {str(root)!r}: {exc.strerror or exc}") from None


def publish(root: str | os.PathLike[str], name: str, data: bytes, *, attempts: int = 20) -> Path:
    """Write ``data`` as the next version of ``name`` under ``root``; return the model file's path.

    ``root`` and ``root/name`` are created if missing. Raises ``OSError`` if no version could be
    claimed after ``attempts`` races.
    """
    commit, discard = stage(root, name, data, attempts=attempts)
    try:
        return Path(commit())
    finally:
        discard()


def stage(root: str | os.PathLike[str], name: str, data: bytes, *,
          attempts: int = 20) -> tuple[Callable[[], str], Callable[[], None]]:
    """Write ``data`` into a hidden staging directory of ``root/name``; return ``(commit, discard)``.

    ``commit()`` renames it to the next free version number and returns the model file's path;
    ``discard()`` removes whatever is left of the staging directory (call it in any case). For
    :meth:`bnfold.atomic.Writes.add`. ``OSError`` becomes a :class:`BnfoldError` naming the repository,
    never the staging directory.
    """
    model_dir = Path(root) / check_name(name)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    except OSError as exc:
        raise BnfoldError(f"cannot write into repository {str(root)!r}: {exc.strerror or exc}") from None

    def discard() -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)

    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a server running as another user must read it
        (staging / MODEL_FILE).write_bytes(data)
    except OSError as exc:
        discard()
        raise BnfoldError(f"cannot write into repository {str(root)!r}: {exc.strerror or exc}") from None

    def commit() -> str:
        for _ in range(attempts):
            target = model_dir / str(next_version(root, name))
            try:
                staging.rename(target)
            except OSError as exc:
                if target.exists():  # another writer took this number first
                    continue
                raise BnfoldError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
            return str(target / MODEL_FILE)
        raise OSError(f"could not claim a new version under {model_dir} after {attempts} attempts")

    return commit, discard
