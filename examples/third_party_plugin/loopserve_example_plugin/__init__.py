"""An example third-party plugin: ``loop=budgeted`` and ``policy=shortest_first``.

Install it next to loopserve (``pip install ./examples/third_party_plugin``) and select them:
``loopserve generate prompt="Hi" loop=budgeted policy=shortest_first``. Its progress lines go
through ``logging`` (logger ``loopserve_example_plugin``), never ``print``: stdout belongs to
the command's own output, which ``output_format=json`` and ``loopserve bench`` keep parseable.
"""

from __future__ import annotations

import logging

from loopserve.core import hookimpl
from loopserve.core.loop import RunnerLoop
from loopserve.core.sched.policy import BatchingPolicy

log = logging.getLogger(__name__)


class BudgetedLoop(RunnerLoop):
    """The normal loop's stages (a runner of depth 0), plus a log line every
    ``loop.params.report_every`` forwards. Built on ``RunnerLoop``, it inherits the stage
    order, chunked-prefill fairness and idle checks; it only adds what is its own."""

    name = "budgeted"
    depth = 0
    default_params = {"report_every": 100}

    def iteration(self) -> bool:
        before = self.scheduler.stats.num_forwards
        did_work = super().iteration()
        s = self.scheduler
        every = int(self.config.loop.params.get("report_every", 100))
        if s.stats.num_forwards != before and s.stats.num_forwards % every == 0:
            log.info("[budgeted] %d forwards, %d tokens", s.stats.num_forwards, s.stats.num_generated_tokens)
        return did_work


class ShortestFirst(BatchingPolicy):
    """Admit the requests with the fewest tokens left to compute first."""

    name = "shortest_first"

    def order(self, waiting):
        return sorted(waiting, key=lambda r: r.seq_len - r.num_computed)


@hookimpl
def loopserve_add_config(config_store):
    # The loop's node (loop=budgeted, with default_params) is stored by loopserve itself.
    config_store.store(group="policy", name="shortest_first", node={"name": "shortest_first"})


@hookimpl
def loopserve_register_loops():
    return [BudgetedLoop]


@hookimpl
def loopserve_register_policies():
    return {"shortest_first": ShortestFirst}
