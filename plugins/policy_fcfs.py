"""``policy=fcfs``: first come, first served — admission in arrival order.

Retracted requests were put back at the head of the queue, so they keep their place.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.sched.policy import BatchingPolicy
from loopserve.core.sched.req import Req


class FCFSPolicy(BatchingPolicy):
    name = "fcfs"

    def order(self, waiting: list[Req]) -> list[Req]:
        return waiting


@hookimpl
def loopserve_register_policies():
    return {"fcfs": FCFSPolicy}
