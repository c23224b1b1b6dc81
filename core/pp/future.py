"""A micro-batch in flight (``PPFuture``), the error a failed pipeline raises, and the
single-stage form of the pipeline. No torch here: ``loop=pp`` loads with the plugins."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardResult


class StageError(RuntimeError):
    """A pipeline stage died, hung past ``parallel.stage_timeout_s`` or failed."""


class PPFuture:
    """One micro-batch in flight: ``launch_done`` once stage 0 has read its inputs, ``done``
    once the last stage's tokens are back (or the pipeline failed)."""

    __slots__ = ("fb", "mb_id", "launch_done", "done", "result", "error", "on_launch", "on_done",
                 "t_launch", "t_sent", "t_done")

    def __init__(self, fb: ForwardBatch, mb_id: int) -> None:
        self.fb, self.mb_id = fb, mb_id
        self.launch_done = threading.Event()
        self.done = threading.Event()
        self.result: ForwardResult | None = None
        self.error: BaseException | None = None
        # Called on the launch thread before stage 0 runs (resolves placeholder ids) and on
        # the receive thread with the tokens (stores them for later micro-batches).
        self.on_launch: Callable[[ForwardBatch], None] | None = None
        self.on_done: Callable[[list[int]], None] | None = None
        self.t_launch = self.t_sent = self.t_done = 0.0

    def wait(self, timeout: float | None = None) -> ForwardResult:
        if not self.done.wait(timeout):
            raise StageError(f"micro-batch {self.mb_id} did not come back within {timeout} s")
        if self.error is not None:
            raise StageError(f"the pipeline failed: {self.error}") from self.error
        assert self.result is not None
        return self.result


class SingleStage:
    """``loop=pp`` over a plain worker (``pp_size=1``, or a worker with no pipeline form): one
    thread runs its forward passes in order behind the same ``submit`` as ``PipelineWorker``,
    so the loop and its scheduler role behave the same with one stage as with many."""

    def __init__(self, worker: Any, grad_mode: str = "no_grad") -> None:
        self.worker = worker
        self.grad_mode = grad_mode
        self._next_mb = 0
        self._q: queue.SimpleQueue[PPFuture | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loopserve-pp-single", daemon=True)
        self._thread.start()

    def submit(self, fb: ForwardBatch) -> PPFuture:
        fut = PPFuture(fb, self._next_mb)
        self._next_mb += 1
        self._q.put(fut)
        return fut

    def _run(self) -> None:
        from loopserve.core.loop.grad_mode import grad_context

        with grad_context(self.grad_mode):  # grad mode is per thread
            while True:
                fut = self._q.get()
                if fut is None:
                    return
                try:
                    fut.t_launch = time.perf_counter()
                    fut.result = self.worker.forward_batch(fut.fb)
                    fut.t_done = time.perf_counter()
                    if not fut.result.forward_time_s:
                        fut.result.forward_time_s = fut.t_done - fut.t_launch
                except BaseException as exc:  # noqa: BLE001 - handed to the loop thread
                    fut.error = exc
                fut.launch_done.set()
                fut.done.set()

    def close(self, timeout: float = 10.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)
