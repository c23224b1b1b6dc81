"""Memory budgets checked before large allocations.

An absurd setting (``kv_cache.num_tokens=10**12``, a config.json whose
``max_position_embeddings`` is a billion, ``scheduler.max_running_requests=10**9``) must fail
with a ``ValueError`` that names the key and says what to change, not with an allocator's
RuntimeError, a MemoryError, or an overcommitted process the kernel kills later. The worker
checks its device allocations here, the scheduler its host-side bookkeeping.

Part of the scheduling core: no torch.
"""

from __future__ import annotations

import os
from typing import NamedTuple

#: Host bytes of scheduler bookkeeping per KV page (a flag, a free-list entry and its int
#: object, rounded up) and per request row.
BOOKKEEPING_BYTES_PER_PAGE = 64
BOOKKEEPING_BYTES_PER_ROW = 64


class Need(NamedTuple):
    """One allocation: what it is, its size, and the setting that shrinks it."""

    what: str
    nbytes: int
    fix: str


def available_host_bytes() -> int:
    """Memory the host can still give (MemAvailable), or its physical memory if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(needs: list[Need], available: int, where: str) -> None:
    """ValueError if ``needs`` together exceed ``available`` bytes, naming the largest part
    and the setting that shrinks it."""
    total = sum(n.nbytes for n in needs)
    if total <= available:
        return
    parts = ", ".join(f"{n.what} {_gib(n.nbytes)}" for n in needs)
    big = max(needs, key=lambda n: n.nbytes)
    raise ValueError(f"not enough memory on {where}: needs {_gib(total)} ({parts}) but only "
                     f"{_gib(available)} is available; {big.fix}")


def check_scheduler_bookkeeping(num_pages: int, max_running: int) -> None:
    """The scheduler's host-side page and row tables must fit in host memory."""
    check_fits([
        Need("KV page tables", num_pages * BOOKKEEPING_BYTES_PER_PAGE, "lower kv_cache.num_tokens"),
        Need("request rows", max_running * BOOKKEEPING_BYTES_PER_ROW, "lower scheduler.max_running_requests"),
    ], available_host_bytes(), "the host (scheduler bookkeeping)")
