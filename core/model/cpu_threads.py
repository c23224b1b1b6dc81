"""``CpuThreads``: how many OpenMP threads the model's forward passes use on the CPU, and why.

torch parallelizes each op over an OpenMP team and waits for the slowest member at the end
of every parallel region. When another process is busy on one of the cores, the team member
that shares that core gets a time slice now and then, and every op of a decode step waits for
it: on two cores with one busy neighbour, two threads ran several times slower than one
(docs/benchmarks.md, "CPU threads under contention"). A fixed single thread, on the other
hand, gives away a quarter of the quiet machine's throughput.

So the thread count is chosen at run time:

- the ceiling is the CPUs this process may use: its affinity mask, capped by a cgroup (v2
  ``cpu.max`` or v1 ``cfs_quota_us``) CPU quota, not the host's core count; ``model.num_threads``
  fixes the count instead (and turns the adaptation off);
- before a forward pass, at most twice a second, the CPU time the *other* processes used on
  those CPUs since the last look (``/proc/stat`` minus this process's ``/proc/self/stat``) is
  subtracted from the ceiling; each core they keep busy is one thread less (never below one).

The count is set on the thread that runs the forward passes (``ComputeThread``): OpenMP keeps
the team size per calling thread. Shrinking the team is what helps under contention; OpenMP's
wait policy is left as it is (``current_openmp_env`` says why).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("loopserve.threads")

# How often the neighbours' CPU use is sampled: a read of two /proc files, under 1 ms measured
# on the loaded 2-core machine, so at most ~0.2% of the time.
SAMPLE_INTERVAL_S = 0.5


def affinity_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), or all of them where the mask
    cannot be read."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (``cpu.max`` of v2, or
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of v1), or None when there is none."""
    for path in (f"{root}/cpu.max",):
        try:
            with open(path, encoding="ascii") as f:
                quota, _, period = f.read().strip().partition(" ")
        except OSError:
            continue
        if quota == "max" or not period:
            return None
        return int(quota) / int(period)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            with open(f"{root}/{sub}/cpu.cfs_quota_us", encoding="ascii") as f:
                quota_us = int(f.read().strip())
            with open(f"{root}/{sub}/cpu.cfs_period_us", encoding="ascii") as f:
                period_us = int(f.read().strip())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """How many CPUs this process can keep busy, and where that number came from."""
    cpus = len(affinity_cpus())
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None and math.ceil(quota) < cpus:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}"
    return max(1, cpus), "affinity mask"


OPENMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_PROC_BIND")


def current_openmp_env() -> dict[str, str]:
    """The OpenMP settings of the environment, as reported next to the thread count.

    NOTE: loopserve leaves OpenMP's wait policy alone. torch's CPU wheels ship GNU libgomp,
    whose threads spin a while before they sleep; shorter spinning (``GOMP_SPINCOUNT=1000``,
    ``OMP_WAIT_POLICY=PASSIVE``) cost 25-45% on a quiet machine and, once the team shrinks
    under contention, made no difference beyond the noise (docs/benchmarks.md)."""
    return {k: os.environ[k] for k in OPENMP_VARS if k in os.environ}


class _Neighbours:
    """CPU time used by other processes on a set of CPUs, from ``/proc/stat`` deltas."""

    def __init__(self, cpus: list[int], stat: str = "/proc/stat", own: str = "/proc/self/stat") -> None:
        self.names = {f"cpu{c}" for c in cpus}
        self.stat, self.own = stat, own
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            busy = 0
            with open(self.stat, encoding="ascii") as f:
                for line in f:
                    name, _, rest = line.partition(" ")
                    if name in self.names:
                        v = [int(x) for x in rest.split()]
                        busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            with open(self.own, encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
            own = int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), float(busy), float(own)

    def busy_cores(self) -> float | None:
        """Cores the other processes kept busy since the previous call (None: unknown)."""
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / self.tick / (now[0] - last[0]))


@dataclass
class ThreadChoice:
    """What ``loopserve bench`` reports and the start-up log line says."""

    num_threads: int  # the count in use now (the ceiling until the first adaptation)
    max_threads: int
    source: str  # model.num_threads | OMP_NUM_THREADS | affinity mask | cgroup CPU quota ...
    adaptive: bool
    openmp_env: dict[str, str]


class CpuThreads:
    """Sets and adapts the compute thread's OpenMP team size (call from that thread only)."""

    def __init__(self, num_threads: int | None = None) -> None:
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"model.num_threads must be >= 1 (or null for automatic); got {num_threads}")
            ceiling, source, adaptive = num_threads, "model.num_threads", False
        elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            ceiling, source, adaptive = max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS", False
        else:
            ceiling, source = usable_cpus()
            adaptive = ceiling > 1
        self.choice = ThreadChoice(ceiling, ceiling, source, adaptive, current_openmp_env())
        self._neighbours = _Neighbours(affinity_cpus()) if adaptive else None
        self._next_sample = 0.0
        self._applied: dict[int, int] = {}  # thread ident -> team size set there
        self.changes = 0

    def start(self) -> None:
        """Set the team size on the calling (compute) thread and log the choice."""
        self._apply()
        c = self.choice
        log.info("CPU threads: %d (%s%s); OpenMP env %s", c.max_threads, c.source,
                 ", fewer while other processes keep cores busy" if c.adaptive else "",
                 c.openmp_env or "default")

    def _apply(self) -> None:
        # OpenMP keeps the team size per thread: set it on every thread that runs passes.
        ident = threading.get_ident()
        if self._applied.get(ident) != self.choice.num_threads:
            import torch

            # NOTE: only when the count differs. Setting the team size a thread already has
            # (torch.set_num_threads(2) on a thread whose OpenMP default is 2) made the quiet
            # 2-core machine's decode 10-15% slower (docs/benchmarks.md).
            if torch.get_num_threads() != self.choice.num_threads:
                torch.set_num_threads(self.choice.num_threads)
            self._applied[ident] = self.choice.num_threads

    def before_forward(self) -> None:
        """Adapt the team size to the cores other processes leave free (sampled at most every
        ``SAMPLE_INTERVAL_S``; otherwise a clock read and a dict lookup)."""
        if self._neighbours is not None:
            now = time.monotonic()
            if now >= self._next_sample:
                self._next_sample = now + SAMPLE_INTERVAL_S
                busy = self._neighbours.busy_cores()
                if busy is not None:
                    want = threads_for(self.choice.max_threads, busy)
                    if want != self.choice.num_threads:
                        self.choice.num_threads = want
                        self.changes += 1
                        log.debug("CPU threads: %d (other processes busy on %.2f cores)", want, busy)
        self._apply()

    def report(self) -> dict[str, Any]:
        """The choice as ``loopserve bench`` reports it."""
        c = self.choice
        return {"max_threads": c.max_threads, "source": c.source, "adaptive": c.adaptive,
                "threads_at_end": c.num_threads, "changes": self.changes, "openmp_env": dict(c.openmp_env)}


def threads_for(ceiling: int, busy_cores: float) -> int:
    """The team size for ``ceiling`` usable CPUs when others keep ``busy_cores`` busy: a core
    counts as taken once a neighbour uses more than a third of it."""
    return max(1, min(ceiling, ceiling - math.floor(busy_cores + 2 / 3)))
