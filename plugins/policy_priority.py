"""``policy=priority``: the request with the highest ``priority`` value first (ties in
arrival order), and preemption of lower-priority running requests when a higher-priority
one cannot be admitted for lack of KV memory or running slots.

Preempted requests are retracted, not dropped: they go back to the queue and are
recomputed later, so their outputs are unchanged.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.sched.policy import BatchingPolicy
from loopserve.core.sched.req import Req


class PriorityPolicy(BatchingPolicy):
    name = "priority"

    def order(self, waiting: list[Req]) -> list[Req]:
        return sorted(waiting, key=lambda r: -r.priority)

    def preempt_for(self, req: Req, running: list[Req]) -> list[Req]:
        if not self.params.get("preemption", True):
            return []
        lower = [r for r in running if r.priority < req.priority]
        # Lowest priority first; among equals, the one with the least work done.
        return sorted(lower, key=lambda r: (r.priority, len(r.output_ids)))


@hookimpl
def loopserve_register_policies():
    return {"priority": PriorityPolicy}
