"""Usable CPUs from the cgroup quota, and thread shares that do not oversubscribe."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import cpu
from service.cpu import cgroup_cpu_limit, threads_per_session, usable_cpus


@pytest.mark.parametrize(("v2", "v1", "expected"), [
    pytest.param("max 100000\n", None, None, id="v2-unlimited"),
    pytest.param("150000 100000\n", None, 1.5, id="v2-quota"),
    pytest.param(None, ("200000", "100000"), 2.0, id="v1-quota"),
    pytest.param(None, ("-1", "100000"), None, id="v1-unlimited"),
    pytest.param("garbage", None, None, id="unreadable"),
    pytest.param(None, None, None, id="absent"),
])
def test_cgroup_cpu_limit(tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, expected: float | None) -> None:
    paths = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    if v2 is not None:
        paths[0].write_text(v2)
    if v1 is not None:
        paths[1].write_text(v1[0])
        paths[2].write_text(v1[1])
    assert cgroup_cpu_limit(*paths) == expected


@pytest.mark.parametrize(("workers", "sessions", "cpus", "expected"), [
    pytest.param(1, 1, 8, 8, id="one-model"),
    pytest.param(2, 2, 8, 2, id="shared"),
    pytest.param(4, 3, 8, 1, id="never-zero"),
    pytest.param(1, 0, 2, 2, id="no-models"),
])
def test_threads_per_session(workers: int, sessions: int, cpus: int, expected: int) -> None:
    assert threads_per_session(workers, sessions, cpus) == expected


@pytest.mark.parametrize(("affinity", "quota", "expected"), [
    pytest.param(8, 1.5, 2, id="quota-rounds-up"),
    pytest.param(2, 16.0, 2, id="affinity-smaller"),
    pytest.param(8, None, 8, id="no-quota"),
    pytest.param(4, 0.1, 1, id="tiny-quota"),
])
def test_usable_cpus(monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, expected: int) -> None:
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: quota)
    assert usable_cpus() == expected
