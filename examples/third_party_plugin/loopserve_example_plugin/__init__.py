"""An example third-party plugin: ``loop=budgeted`` and ``policy=shortest_first``.

Install it next to loopserve (``pip install ./examples/third_party_plugin``) and select them:
``loopserve generate prompt="Hi" loop=budgeted policy=shortest_first``. Its progress lines go
through ``logging`` (logger ``loopserve_example_plugin``), never ``print``: stdout belongs to
the command's own output, which ``output_format=json`` and ``loopserve bench`` keep parseable.
"""

from __future__ import annotations

import logging

from loopserve.core import hookimpl
from loopserve.core.loop import EventLoop
from loopserve.core.sched.policy import BatchingPolicy

log = logging.getLogger(__name__)


class BudgetedLoop(EventLoop):
    """The normal loop's stages, but it logs a line (INFO) every ``loop.params.report_every``
    batches."""

    name = "budgeted"

    def iteration(self) -> bool:
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is None:
            self.stage("self_check_during_idle", s.self_check_during_idle)
            return bool(received)
        result = self.stage("run_batch", s.run_batch, batch)
        self.stage("process_batch_result", s.process_batch_result, batch, result)
        every = int(self.config.loop.params.get("report_every", 100))
        if s.stats.num_forwards % every == 0:
            log.info("budgeted loop: %d forwards, %d tokens", s.stats.num_forwards, s.stats.num_generated_tokens)
        return True


class ShortestFirst(BatchingPolicy):
    """Admit the requests with the fewest tokens left to compute first."""

    name = "shortest_first"

    def order(self, waiting):
        return sorted(waiting, key=lambda r: r.seq_len - r.num_computed)


@hookimpl
def loopserve_add_config(config_store):
    config_store.store(group="loop", name="budgeted", node={"name": "budgeted", "params": {"report_every": 100}})
    config_store.store(group="policy", name="shortest_first", node={"name": "shortest_first"})


@hookimpl
def loopserve_register_loops():
    return {"budgeted": BudgetedLoop}


@hookimpl
def loopserve_register_policies():
    return {"shortest_first": ShortestFirst}
