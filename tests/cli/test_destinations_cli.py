"""Destinations are checked before any work: an unwritable or clashing one is refused at once, by name.

Each refusal is exit code 2 with one line on stderr naming the file the user asked for (never a
temporary file), and nothing is written. The input files here are not even models: a refusal
that waited for loading would fail on them differently.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory that exists but takes no new file (chmod 555; root ignores that, so /sys there)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        os.close(tempfile.mkstemp(dir="/sys")[0])
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("running as root and /sys takes files: no unwritable directory to test with")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    assert ".tmp" not in lines[0] and "staging" not in lines[0], lines[0]  # no temporary file named
    return lines[0]


@pytest.mark.parametrize(
    ("destination", "what"),
    [pytest.param(["-o", "{ro}/out.onnx"], "cannot write output '{ro}/out.onnx'", id="output"),
     pytest.param(["-o", "ok.onnx", "--report", "{ro}/r.json"], "cannot write report '{ro}/r.json'", id="report"),
     pytest.param(["--repository", "{ro}/models", "--name", "m"], "cannot write into repository '{ro}/models'",
                  id="repository")],
)
def test_fold_refuses_an_unwritable_destination_before_loading(run_bnfold, tmp_path: Path, unwritable: Path,
                                                              destination: list[str], what: str) -> None:
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint: loading it would fail differently")
    before = _files(tmp_path)
    proc = run_bnfold("fold", "x.pt", *[d.format(ro=unwritable) for d in destination], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert _one_error_line(proc.stderr).startswith(f"bnfold: error: {what.format(ro=unwritable)}: ")
    assert _files(tmp_path) == before


def test_train_refuses_an_unwritable_plot_before_training(run_bnfold, tmp_path: Path, unwritable: Path) -> None:
    proc = run_bnfold("train", "-o", "ok.pt", "--plot", unwritable / "p.png", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc.stderr).startswith(f"bnfold: error: cannot write plot '{unwritable}/p.png': ")
    assert list(tmp_path.iterdir()) == ([unwritable] if unwritable.parent == tmp_path else [])  # no ok.pt


@pytest.mark.parametrize(
    ("output", "message"),
    [pytest.param("x.onnx", "output 'x.onnx' is the input file 'x.onnx'", id="same-name"),
     pytest.param("./sub/../x.onnx", "output 'sub/../x.onnx' is the input file 'x.onnx'", id="other-relative-path"),
     pytest.param("{tmp}/x.onnx", "output '{tmp}/x.onnx' is the input file 'x.onnx'", id="absolute-path"),
     pytest.param("link.onnx", "output 'link.onnx' is the input file 'x.onnx'", id="symlink")],
)
def test_fold_refuses_to_overwrite_its_input(run_bnfold, tmp_path: Path, output: str, message: str) -> None:
    (tmp_path / "x.onnx").write_bytes(b"the user's model")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to("x.onnx")
    proc = run_bnfold("fold", "x.onnx", "-o", output.format(tmp=tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc.stderr) == f"bnfold: error: {message.format(tmp=tmp_path)}; write to another file"
    assert (tmp_path / "x.onnx").read_bytes() == b"the user's model"


def test_fold_refuses_a_report_that_is_the_output(run_bnfold, tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"irrelevant")
    proc = run_bnfold("fold", "x.pt", "-o", "out.onnx", "--report", "./out.onnx", cwd=tmp_path)
    assert proc.returncode == 2
    assert "the output and the report are the same file" in _one_error_line(proc.stderr)


@pytest.mark.parametrize("layout", [pytest.param("missing", id="missing"), pytest.param("empty", id="empty"),
                                    pytest.param("no-version", id="model-without-version")])
def test_serve_refuses_a_repository_without_models(run_bnfold, tmp_path: Path, layout: str) -> None:
    repo = tmp_path / "typo"
    if layout != "missing":
        repo.mkdir()
    if layout == "no-version":
        (repo / "digits").mkdir()
        (repo / "digits" / "model.onnx").write_bytes(b"not in a version directory")
    proc = run_bnfold("serve", "--model-repository", repo, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"bnfold: error: model repository '{repo}' ")
    assert ("does not exist" if layout == "missing" else "holds no model") in line


def test_serve_reads_the_repository_from_the_environment_too(run_bnfold, tmp_path: Path) -> None:
    proc = run_bnfold("serve", env={"BNFOLD_MODEL_REPOSITORY": str(tmp_path / "nope")}, timeout=120)
    assert proc.returncode == 2
    assert f"model repository '{tmp_path / 'nope'}' does not exist" in _one_error_line(proc.stderr)


def test_poll_mode_may_start_on_an_empty_repository_but_not_a_missing_one(tmp_path: Path) -> None:
    from bnfold.cli.serve import check_repository
    from bnfold.errors import BnfoldError

    check_repository(tmp_path, may_be_empty=True)  # models written later go live by themselves
    with pytest.raises(BnfoldError, match="holds no model"):
        check_repository(tmp_path)
    with pytest.raises(BnfoldError, match="does not exist"):
        check_repository(tmp_path / "typo", may_be_empty=True)


def test_serve_help_lists_model_control(run_bnfold) -> None:
    proc = run_bnfold("serve", "--help")
    assert proc.returncode == 0
    assert "--model-control {none,explicit,poll}" in proc.stdout and "--repository-poll-s" in proc.stdout
