"""The overlap loop: the CPU schedules batch N+1 and processes batch N's result while the
device (or, on the CPU, the compute thread) runs batch N+1. A runner of depth 1.

``run_batch`` only launches: the batch's sampled tokens exist as placeholder ids, which the
requests' ``output_ids`` and the next batch's inputs carry until the executor resolves them,
just before the forward that reads them. Each iteration launches the current batch first, then
processes the previous batch's result, after the launched batch's ``launch_done`` (its inputs
are copied) so nothing it still reads is freed under it. An empty queue is primed with a
``DUMMY_FIRST`` entry, so the first launch also has a "previous result" to process.

Consequences: results lag one iteration; a request that hits EOS or a stop string still rides
in the already-launched next batch, whose token is discarded and whose KV slot is freed with
the request; the loop is idle only once nothing is in flight. All of this lives in
``core/loop/runner.py``; this module only names the depth.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.loop import RunnerLoop


class OverlapLoop(RunnerLoop):
    name = "overlap"
    depth = 1


@hookimpl
def loopserve_register_loops():
    return [OverlapLoop]
