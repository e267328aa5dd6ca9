"""Atomic writes: complete file or nothing, with the permissions a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnfold.atomic import Writes, atomic_path, check_writable, write_bytes
from bnfold.errors import BnfoldError


def test_write_replaces_target_completely(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failure_leaves_nothing_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644


def test_check_writable_leaves_nothing_and_names_the_target(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a.onnx", "output") == tmp_path / "a.onnx"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BnfoldError, match=r"output directory '.*missing' does not exist"):
        check_writable(tmp_path / "missing" / "a.onnx", "output")
    with pytest.raises(BnfoldError, match=r"report '.*' is a directory, expected a file name"):
        check_writable(tmp_path, "report")


def test_an_os_error_names_the_target_not_the_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(BnfoldError, match=r"^cannot write plot '.*out\.bin': No space left on device$"), \
            atomic_path(target, "plot"):
        raise OSError(28, "No space left on device", str(tmp_path / ".out.bin.abc123.tmp"))
    assert list(tmp_path.iterdir()) == []


def test_writes_put_every_file_in_place_or_none(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"old b")
    with Writes() as writes:
        writes.bytes(tmp_path / "a", b"new a")
        writes.bytes(tmp_path / "b", b"new b")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["b"]  # staged only
        assert writes.commit() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b"new b"
    with pytest.raises(RuntimeError), Writes() as writes:
        writes.bytes(tmp_path / "c", b"c")
        writes.bytes(tmp_path / "b", b"newer b")
        raise RuntimeError("a later step failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and (tmp_path / "b").read_bytes() == b"new b"
