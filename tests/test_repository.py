"""bnfold.repository: DIR/NAME/<version>/model.onnx, next versions, atomic publishing."""

from __future__ import annotations

import os

import pytest

from bnfold.repository import check_name, model_path, next_version, publish, versions


def test_publish_appends_versions(tmp_path) -> None:
    assert next_version(tmp_path, "digits") == 1
    first = publish(tmp_path, "digits", b"one")
    second = publish(tmp_path, "digits", b"two")
    assert first == model_path(tmp_path, "digits", 1)
    assert second == model_path(tmp_path, "digits", 2)
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert versions(tmp_path, "digits") == [1, 2]
    assert [p.name for p in (tmp_path / "digits").iterdir() if p.name.startswith(".")] == []  # no staging left


def test_next_version_skips_past_gaps_and_ignores_other_entries(tmp_path) -> None:
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert next_version(tmp_path, "m") == 4
    assert versions(tmp_path, "m") == []  # version 3 has no model file
    assert publish(tmp_path, "m", b"x") == model_path(tmp_path, "m", 4)


@pytest.mark.parametrize(
    "name",
    [pytest.param("", id="empty"), pytest.param("..", id="dotdot"), pytest.param("a/b", id="slash"),
     pytest.param("-x", id="leading-dash"), pytest.param("x" * 65, id="too-long")],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="model name must be"):
        check_name(name)


def test_good_names() -> None:
    assert check_name("digits_v2.cnn-1") == "digits_v2.cnn-1"


def test_version_directory_follows_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = publish(tmp_path, "m", b"x")
    finally:
        os.umask(old)
    assert path.parent.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: a server user must read it


def test_a_staged_version_appears_only_at_commit(tmp_path) -> None:
    from bnfold.repository import stage

    commit, discard = stage(tmp_path, "m", b"x")
    assert versions(tmp_path, "m") == []
    assert commit() == str(model_path(tmp_path, "m", 1))
    discard()
    commit, discard = stage(tmp_path, "m", b"y")
    discard()  # a later step failed: no version 2, no staging directory left
    assert versions(tmp_path, "m") == [1] and sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_check_writable_refuses_a_file_in_the_way(tmp_path) -> None:
    from bnfold.errors import BnfoldError
    from bnfold.repository import check_writable

    check_writable(tmp_path / "new" / "models", "m")  # the nearest existing directory takes entries
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "models").write_text("a file")
    with pytest.raises(BnfoldError, match="exists and is not a directory"):
        check_writable(tmp_path / "models", "m")
