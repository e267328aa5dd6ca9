"""Multiprocess plumbing of service.metrics (the cross-worker sums run in test_service_workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.metrics import MULTIPROC_ENV, ServiceMetrics, forget_dead_workers, multiprocess_dir, shared_directory


@pytest.mark.parametrize("previous", [pytest.param(None, id="unset"), pytest.param("/elsewhere", id="set")])
def test_shared_directory_exports_a_private_dir_and_restores(monkeypatch: pytest.MonkeyPatch,
                                                             previous: str | None) -> None:
    if previous is None:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    else:
        monkeypatch.setenv(MULTIPROC_ENV, previous)
    with shared_directory() as path:
        assert os.environ[MULTIPROC_ENV] == str(path)
        assert list(path.iterdir()) == [] and path.stat().st_mode & 0o777 == 0o700
        (path / "counter_1.db").write_bytes(b"x")
    assert os.environ.get(MULTIPROC_ENV) == previous
    assert not path.exists()


def test_variable_set_after_import_keeps_single_process_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """prometheus_client chose its in-memory store at import: reading the directory would show nothing."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    assert multiprocess_dir() is None
    metrics = ServiceMetrics()
    metrics.request("m", "success", 0.01)
    metrics.close()
    assert 'bnfold_requests_total{model="m",outcome="success"} 1.0' in metrics.render().decode()
    assert list(tmp_path.iterdir()) == []


def test_forget_dead_workers_drops_only_live_gauges_of_dead_pids(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True, text=True)
    dead_pid, own_pid = int(dead.stdout), os.getpid()
    names = [f"gauge_livemin_{dead_pid}.db", f"gauge_livemin_{own_pid}.db", f"counter_{dead_pid}.db",
             f"histogram_{dead_pid}.db", f"gauge_max_{dead_pid}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(tmp_path) == [dead_pid]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names[1:])
