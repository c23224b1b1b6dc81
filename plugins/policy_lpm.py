"""``policy=lpm``: longest prefix match first.

Requests whose prompt shares the longest prefix with the radix cache go first, so cached KV
is reused before it is evicted. Matching costs a tree walk per waiting request, so above
``policy.params.queue_threshold`` waiting requests (default 128) it falls back to arrival
order, as SGLang does; without a radix cache it is fcfs.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.sched.policy import BatchingPolicy
from loopserve.core.sched.req import Req


class LongestPrefixMatch(BatchingPolicy):
    name = "lpm"

    def order(self, waiting: list[Req]) -> list[Req]:
        tree = getattr(self.scheduler, "tree_cache", None)
        if tree is None or len(waiting) > int(self.params.get("queue_threshold", 128)):
            return waiting
        # sorted() is stable: equal matches keep arrival order.
        return sorted(waiting, key=lambda r: -tree.match_len(r.all_ids[: r.seq_len - 1]))


@hookimpl
def loopserve_register_policies():
    return {"lpm": LongestPrefixMatch}
