"""``bnfold train`` in two gloo processes: under torchrun, with ``--nproc``, and with a rank that dies.

The two-process checkpoint must fold with ``bnfold fold``, serve, and reach the accuracy of one
process training with the same global batch. Starting torch twice is what these tests pay for.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnfold.checkpoint import load_model, read_checkpoint
from bnfold.train import TrainConfig, train

RunBnfold = Callable[..., subprocess.CompletedProcess[str]]  # the run_bnfold fixture (tests/cli/conftest.py)
OPTIONS = ["--epochs", "3", "--width", "8", "--depth", "2", "--lr", "0.03", "--batch-size", "64"]
DEADLINE_S = 300  # generous upper bound on a loaded 2-core machine; a hang fails here
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``torchrun --nproc-per-node 2 -m bnfold train`` on the bundled digits, in a fresh directory."""
    cwd = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bnfold", "train", *OPTIONS, "-o", "ddp.pt", "--plot", "curves.png"]
    proc = subprocess.run(command, cwd=cwd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False)
    return proc, cwd


@pytest.mark.slow
def test_torchrun_two_processes_write_one_plain_checkpoint(ddp_run: tuple[subprocess.CompletedProcess[str], Path]
                                                          ) -> None:
    proc, cwd = ddp_run
    assert proc.returncode == 0, proc.stderr
    assert ("training: world size 2, backend gloo, device cpu, global batch 64 (32 per process), sync-bn on"
            in proc.stderr.splitlines())
    assert sum(line.startswith("epoch 1/3 ") for line in proc.stderr.splitlines()) == 1  # rank 0 alone reports
    assert proc.stdout.count("saved ddp.pt: cnn on digits") == 1 and "on 2 processes (gloo)" in proc.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["curves.png", "ddp.pt"]  # no temporary files left

    raw = read_checkpoint(cwd / "ddp.pt")
    assert not [k for k in raw["state_dict"] if k.startswith("module.")]  # unwrapped from DDP
    assert raw["metrics"]["world_size"] == 2 and raw["metrics"]["sync_bn"] is True
    assert raw["metrics"]["backend"] == "gloo" and raw["resume"]["epoch"] == raw["metrics"]["best_epoch"]
    loaded = load_model(cwd / "ddp.pt")
    kinds = {type(m) for m in loaded.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.BatchNorm2d}  # synchronized batch norm converted back


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
        ddp_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, cwd = ddp_run
    assert proc.returncode == 0, proc.stderr
    ddp = load_model(cwd / "ddp.pt").meta["metrics"]["history"]
    single = train(TrainConfig(epochs=3, batch_size=64, lr=0.03, arch_config={"width": 8, "depth": 2},
                               device="cpu")).history
    # The same global batches (the sampler pads the 1437 training samples by one) and the same
    # initialization; the padded sample and the order of float sums still steer the two runs apart a
    # little (val loss 1.207 vs 1.236 after epoch 1, measured). Accuracy must agree within the noise of
    # 359 validation samples: two standard deviations of an accuracy near 0.9 are 0.03.
    for mine, theirs in zip(ddp, single, strict=True):
        assert abs(mine["val_accuracy"] - theirs["val_accuracy"]) <= 0.03, (ddp, single)
    assert ddp[-1]["val_accuracy"] > 0.9  # and it did learn


@pytest.mark.slow
def test_the_two_process_checkpoint_folds_and_serves(ddp_run: tuple[subprocess.CompletedProcess[str], Path],
                                                     run_bnfold: RunBnfold) -> None:
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    proc, cwd = ddp_run
    assert proc.returncode == 0, proc.stderr
    folded = run_bnfold("fold", "ddp.pt", "--repository", "models", "--name", "digits", "--quiet", cwd=cwd)
    assert folded.returncode == 0, folded.stderr
    assert "verification: passed" in folded.stdout and ", 0 kept" in folded.stdout, folded.stdout

    loaded = load_model(cwd / "ddp.pt")
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 16, (8, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    with TestClient(create_app(Settings(model_repository=cwd / "models", intra_op_threads=1))) as client:
        deadline = time.monotonic() + 60
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        meta = client.get("/v2/models/digits").json()
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32",
                            "data": x.flatten().tolist()}]}
        response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5 + 1e-4 * float(np.abs(expected).max()), rtol=0)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _start_nproc_run(tmp_path: Path, bnfold_argv: list[str], stderr: Path, output: str = "x.pt",
                     ready: str = " 1/500  loss ") -> subprocess.Popen[str]:
    """``bnfold train --nproc 2`` for 500 epochs in its own process group (a terminal's foreground job), with
    SIGINT at its default (a shell without job control would pass it on ignored); returns once ``ready`` is on
    its stderr (by default: the first epoch is done on both ranks, so there is a best epoch to keep)."""
    import signal

    with stderr.open("w") as err:
        proc = subprocess.Popen([*bnfold_argv, "train", "--nproc", "2", "--epochs", "500", "--width", "4",
                                 "--depth", "1", "-o", output], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while ready not in stderr.read_text():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, 9)
    proc.kill()
    proc.wait()


def _finish(proc: subprocess.Popen[str]) -> str:
    """The run's stdout once it ends by itself (at most 120 s: fails the test rather than hang)."""
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _stop(proc)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_rank_that_dies_fails_the_nproc_run_with_a_clear_message(tmp_path: Path, bnfold_argv: list[str]) -> None:
    stderr = tmp_path / "stderr.txt"
    proc = _start_nproc_run(tmp_path, bnfold_argv, stderr, "never.pt")
    try:
        (victim,) = [pid for pid in _descendants(proc.pid) if _rank_of(pid) == "1"]
        os.kill(victim, 9)
    finally:
        out = _finish(proc)
    message = f"bnfold: error: rank 1 of 2 (pid {victim}) was killed by SIGKILL; the other ranks were stopped and " \
              "nothing was saved"
    assert proc.returncode == 1, stderr.read_text()
    assert message in stderr.read_text().splitlines()
    assert out == "" and not (tmp_path / "never.pt").exists()


@pytest.mark.slow
def test_ctrl_c_of_an_nproc_run_saves_the_best_epoch_and_exits_130(tmp_path: Path, bnfold_argv: list[str]) -> None:
    """Ctrl-C as a terminal sends it, to the launcher and both ranks at once: saved, said once, no error."""
    import re
    import signal

    stderr = tmp_path / "stderr.txt"
    proc = _start_nproc_run(tmp_path, bnfold_argv, stderr)
    os.killpg(proc.pid, signal.SIGINT)
    out = _finish(proc)
    err = stderr.read_text()
    assert proc.returncode == 130, err
    found = re.findall(r"interrupted after epoch (\d+) of 500; x.pt holds the best epoch so far \((\d+)\)", err)
    assert len(found) == 1, err  # rank 0 says it, once
    assert "error" not in err and "Traceback" not in err, err
    metrics = load_model(tmp_path / "x.pt").meta["metrics"]
    assert metrics["interrupted"] is True and metrics["best_epoch"] == int(found[0][1])
    assert out.startswith(f"saved x.pt: cnn on digits, best epoch {metrics['best_epoch']} of {found[0][0]} run")


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_ranks_save_is_ignored(tmp_path: Path, bnfold_argv: list[str]) -> None:
    """Pressed twice: the agent would stop the ranks again with SIGTERM, killing rank 0 mid-save."""
    import signal

    stderr = tmp_path / "stderr.txt"
    proc = _start_nproc_run(tmp_path, bnfold_argv, stderr)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)  # the ranks are stopping and rank 0 saving: that takes far longer
    os.killpg(proc.pid, signal.SIGINT)
    out = _finish(proc)
    err = stderr.read_text()
    assert proc.returncode == 130, err
    assert "x.pt holds the best epoch so far" in err and out.startswith("saved x.pt: "), err
    assert load_model(tmp_path / "x.pt").meta["metrics"]["interrupted"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt", "x.pt"]  # no temporary file left


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_is_said_once(tmp_path: Path, bnfold_argv: list[str]) -> None:
    import re
    import signal

    stderr = tmp_path / "stderr.txt"
    proc = _start_nproc_run(tmp_path, bnfold_argv, stderr, ready="training: world size 2")  # the epoch begun
    os.killpg(proc.pid, signal.SIGINT)
    _finish(proc)
    err = stderr.read_text()
    assert proc.returncode == 130, err
    # Before the first epoch ends (the usual case) nothing is saved; on a slow machine it may have ended.
    assert len(re.findall(r"^bnfold: interrupted", err, re.MULTILINE)) == 1, err


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_sigterm_to_an_nproc_run_stops_every_rank_and_says_so(tmp_path: Path, bnfold_argv: list[str]) -> None:
    import signal

    stderr = tmp_path / "stderr.txt"
    proc = _start_nproc_run(tmp_path, bnfold_argv, stderr)
    ranks = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: to the launcher alone
    out = _finish(proc)
    err = stderr.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == "bnfold: stopped by SIGTERM, passed on to the ranks still running", err
    assert "Traceback" not in err and out == "" and not (tmp_path / "x.pt").exists()
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists() and _rank_of(pid) is not None]


@pytest.mark.slow
def test_nproc_reports_a_bad_option_once(tmp_path: Path, run_bnfold: RunBnfold) -> None:
    proc = run_bnfold("train", "--nproc", "2", "--batch-size", "63", "--epochs", "1", "-o", "x.pt", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ("bnfold: error: batch size 63 is the global batch and must divide evenly among the 2 "
                           "processes; give a multiple of 2\n")
    assert list(tmp_path.iterdir()) == []


def test_nproc_is_refused_under_torchrun(tmp_path: Path, run_bnfold: RunBnfold) -> None:
    proc = run_bnfold("train", "--nproc", "2", "-o", "x.pt", cwd=tmp_path,
                      env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert proc.returncode == 2
    assert proc.stderr == "bnfold: error: --nproc starts the processes itself; under torchrun leave it out\n"


def test_nproc_hands_torchrun_the_options_as_given() -> None:
    from bnfold.cli import build_parser
    from bnfold.cli.train import _argv

    args = build_parser().parse_args(["train", "--nproc", "2", "--epochs", "1", "--no-sync-bn", "-q",
                                      "--arch-config", '{"expansion": 2}', "-o", "x.pt"])
    assert _argv(args, drop={"nproc"}) == ["--output", "x.pt", "--epochs", "1", "--arch-config", '{"expansion": 2}',
                                           "--no-sync-bn", "--quiet"]
