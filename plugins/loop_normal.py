"""The normal loop: the plain serial loop.

Each iteration receives requests, admits them, forms a batch, runs it and processes its result
before forming the next, so the device idles while the CPU schedules. Simplest and lowest
latency per step; the reference the other loops are checked against. A runner of depth 0.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.loop import RunnerLoop


class NormalLoop(RunnerLoop):
    name = "normal"
    depth = 0


@hookimpl
def loopserve_register_loops():
    return [NormalLoop]
