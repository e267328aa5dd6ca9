"""How many CPUs this process may really use, and how to share them without oversubscribing.

usable = min(|sched_getaffinity|, ceil(cgroup quota / period)); a container limited to 1.5 CPUs
on a 64-core host gets 2, not 64. Each of W worker processes serving M model versions then gives
every onnxruntime session max(1, usable // (W * M)) intra-op threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1_quota: Path = CGROUP_V1_QUOTA,
                     v1_period: Path = CGROUP_V1_PERIOD) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 1.5), or ``None`` when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q, p = int(v1_quota.read_text()), int(v1_period.read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on, respecting affinity and the cgroup quota (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def threads_per_session(workers: int, sessions: int, cpus: int | None = None) -> int:
    """Intra-op threads for one onnxruntime session so W workers x M sessions fit the usable CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus // max(1, workers * max(1, sessions)))
