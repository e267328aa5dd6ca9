"""Atomic file output: write to a temporary file beside the target, then rename.

A failure at any point leaves no partial file behind, and an existing target is only replaced
by a complete new one (``os.replace`` is atomic on POSIX within one file system).

Commands that write several files check every destination first (:func:`check_writable`
creates and removes a temporary file where the real one will go, so a read-only directory
is refused before any work) and stage all files with :class:`Writes`, which renames them into
place only once every one of them has been written: nothing is written unless everything
asked for can be. Errors name the file the user asked for, never the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from bnfold.errors import BnfoldError


def _fail(what: str, target: Path, exc: OSError) -> BnfoldError:
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return BnfoldError(f"cannot write {what} {str(target)!r}: {reason}")


def _temporary(target: Path, what: str) -> Path:
    """A new empty file beside ``target`` with the mode a plain ``open()`` would give it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would have (0666 minus umask).
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
    except OSError as exc:
        raise _fail(what, target, exc) from None
    return tmp_path


def check_writable(target: str | os.PathLike[str], what: str = "output") -> Path:
    """Raise :class:`BnfoldError` unless a file can be written at ``target``; return it as a Path.

    The directory must exist and take a new file: a temporary file is created there and removed.
    """
    p = Path(target)
    if p.is_dir():
        raise BnfoldError(f"{what} {str(p)!r} is a directory, expected a file name")
    if not p.parent.is_dir():
        raise BnfoldError(f"{what} directory {str(p.parent)!r} does not exist")
    _temporary(p, what).unlink()
    return p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], what: str = "output") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success.

    The parent directory must exist. On an exception the temporary file is removed; an
    ``OSError`` becomes a :class:`BnfoldError` naming ``target``.
    """
    target = Path(target)
    tmp_path = _temporary(target, what)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        raise _fail(what, target, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike[str], data: bytes, what: str = "output") -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target, what) as tmp:
        tmp.write_bytes(data)


class Writes:
    """Files staged beside their targets and put in place together by :meth:`commit`.

    Use as a context manager: leaving it without a commit (an exception, a failed check)
    removes every staged file, so none of the targets is touched.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[], str], Callable[[], None]]] = []
        self.written: list[str] = []

    def __enter__(self) -> Writes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()

    def path(self, target: str | os.PathLike[str], what: str = "output") -> Path:
        """A temporary path to write ``target``'s content into; it becomes ``target`` at commit."""
        target = Path(target)
        tmp = _temporary(target, what)

        def commit() -> str:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _fail(what, target, exc) from None
            return str(target)

        def discard() -> None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

        self._pending.append((commit, discard))
        return tmp

    def bytes(self, target: str | os.PathLike[str], data: bytes, what: str = "output") -> None:
        tmp = self.path(target, what)
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise _fail(what, Path(target), exc) from None

    def add(self, commit: Callable[[], str], discard: Callable[[], None]) -> None:
        """Stage something else (a repository version): ``commit`` puts it in place and returns its path."""
        self._pending.append((commit, discard))

    def commit(self) -> list[str]:
        """Put every staged file in place, in the order staged; return their paths."""
        while self._pending:
            commit, _ = self._pending.pop(0)
            self.written.append(commit())
        return self.written

    def discard(self) -> None:
        while self._pending:
            _, discard = self._pending.pop()
            discard()
