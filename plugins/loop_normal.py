"""The normal loop: the plain serial loop of SEED.md.

Each iteration receives requests, admits them, forms a batch, runs it and processes its result
before forming the next, so the device idles while the CPU schedules. Simplest and lowest
latency per step; the reference the other loops are checked against.
"""

from __future__ import annotations

from loopserve.core import hookimpl
from loopserve.core.loop import EventLoop


class NormalLoop(EventLoop):
    name = "normal"

    def iteration(self) -> bool:
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is not None:
            result = self.stage("run_batch", s.run_batch, batch)
            self.stage("process_batch_result", s.process_batch_result, batch, result)
        else:
            self.stage("self_check_during_idle", s.self_check_during_idle)
        s.last_batch = batch
        return batch is not None or bool(received)


@hookimpl
def loopserve_register_loops():
    return {"normal": NormalLoop}
