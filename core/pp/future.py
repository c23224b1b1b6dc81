"""A micro-batch in flight (``PPFuture``) and the error a failed pipeline raises. No torch
here: ``loop=pp`` loads with the plugins."""

from __future__ import annotations

import threading
from typing import Any

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardResult


class StageError(RuntimeError):
    """A pipeline stage died, hung past ``parallel.stage_timeout_s`` or failed."""


class PPFuture:
    """One micro-batch in flight: ``launch_done`` once stage 0 has read its inputs, ``done``
    once the last stage's tokens are back (or the pipeline failed)."""

    __slots__ = ("fb", "mb_id", "job", "launch_done", "done", "result", "error", "t_launch", "t_sent", "t_done")

    def __init__(self, fb: ForwardBatch, mb_id: int) -> None:
        self.fb, self.mb_id = fb, mb_id
        self.launch_done = threading.Event()
        self.done = threading.Event()
        self.result: ForwardResult | None = None
        self.error: BaseException | None = None
        # The runner's launch job (core/loop/runner.py) when the loop launched it: placeholder
        # ids resolved before stage 0, ``launch_done`` once stage 0 read the inputs, and
        # ``job.run`` with the tokens once they are back.
        self.job: Any = None
        self.t_launch = self.t_sent = self.t_done = 0.0

    def wait(self, timeout: float | None = None) -> ForwardResult:
        if not self.done.wait(timeout):
            raise StageError(f"micro-batch {self.mb_id} did not come back within {timeout} s")
        if self.error is not None:
            raise StageError(f"the pipeline failed: {self.error}") from self.error
        assert self.result is not None
        return self.result
