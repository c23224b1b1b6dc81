"""The overlap loop: the CPU schedules batch N+1 and processes batch N's result while the
device (or, on CPU, a forward thread) computes.

``run_batch`` only *launches*: the batch goes to a forward thread and its sampled tokens exist
as placeholders — negative "future" ids that index a future-token map — which the request's
``output_ids`` and the next batch's inputs carry until the forward thread resolves them, in
order, just before the forward that reads them. A result queue holds ``(batch, future)``;
each iteration launches the current batch first, then processes the previous batch's result.
That processing waits on the newly launched batch's ``launch_done`` event (set once the
forward thread has taken it and written its table rows), so nothing the launched batch still
reads is freed under it. When the queue is empty a ``DUMMY_FIRST`` entry primes it, so the
first launch has a "previous result" to process too.

Consequences (SEED.md): results lag one iteration; a request that hits EOS or a stop string
still rides in the already-launched next batch, whose token is discarded and whose KV slot
is freed with the request; the loop is idle only once the queue is drained.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loopserve.core import hookimpl
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode, ForwardResult
from loopserve.core.loop.grad_mode import grad_context
from loopserve.core.loop import EventLoop
from loopserve.core.sched.schedule_batch import ScheduleBatch


@dataclass(eq=False)
class FutureResult:
    """A launched batch's result: placeholder ids now, real tokens once ``done`` is set."""

    placeholders: list[int]
    fb: ForwardBatch | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: ForwardResult | None = None
    error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> ForwardResult:
        if not self.done.wait(timeout):
            raise TimeoutError("the forward thread did not return a result in time")
        if self.error is not None:
            raise RuntimeError("the forward pass failed") from self.error
        assert self.result is not None
        return self.result


class ForwardThread:
    """Runs a worker's forward passes in order on its own thread.

    Future ids are ``-(k + 1)`` for the k-th sampled token handed out. The map is a ring of
    the last ``history`` values: a launched batch only ever refers to the batch launched just
    before it, and one batch's ids are consecutive, so storing a result is one slice
    assignment (between two forwards the device waits for this thread, so it must be quick).
    """

    def __init__(self, worker: Any, grad_mode: str, history: int = 1 << 16) -> None:
        self.worker = worker
        self.grad_mode = grad_mode
        self._queue: queue.SimpleQueue[tuple[ForwardBatch, ScheduleBatch, FutureResult] | None] = queue.SimpleQueue()
        self._ring: list[int] = [0] * history
        self._history = history
        self._next_id = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="loopserve-forward", daemon=True)
        self._thread.start()

    def launch(self, fb: ForwardBatch, batch: ScheduleBatch) -> FutureResult:
        n = fb.batch_size
        # NOTE: the ring must hold this batch's ids and the previous batch's.
        assert 2 * n <= self._history, "batch larger than half the future-token ring"
        first = self._next_id
        future = FutureResult(placeholders=list(range(-first - 1, -first - n - 1, -1)), fb=fb)
        self._next_id += n
        batch.launch_done = threading.Event()
        self._queue.put((fb, batch, future))
        return future

    def _resolve(self, ids: list[int]) -> list[int]:
        ring, cap = self._ring, self._history
        return [ring[(-t - 1) % cap] if t < 0 else t for t in ids]

    def _store(self, placeholders: list[int], tokens: list[int]) -> None:
        if not placeholders:
            return
        ring, cap = self._ring, self._history
        start = (-placeholders[0] - 1) % cap
        end = start + len(tokens)
        if end <= cap:
            ring[start:end] = tokens
        else:
            ring[start:] = tokens[: cap - start]
            ring[: end - cap] = tokens[cap - start :]

    def _run(self) -> None:
        with grad_context(self.grad_mode):  # grad mode is per thread
            while True:
                item = self._queue.get()
                if item is None:
                    return
                fb, batch, future = item
                try:
                    fb.input_ids = self._resolve(fb.input_ids)
                    if fb.output_ids:
                        fb.output_ids = [None if ids is None else self._resolve(ids) for ids in fb.output_ids]
                    # NOTE: from here on the batch's inputs are copied; its KV rows may be freed.
                    batch.launch_done.set()
                    t0 = time.perf_counter()
                    result = self.worker.forward_batch(fb)
                    elapsed = time.perf_counter() - t0
                    self.busy_s += elapsed
                    if not result.forward_time_s:  # a worker that does not time itself
                        result.forward_time_s = elapsed
                    self._store(future.placeholders, result.next_token_ids)
                    future.result = result
                except BaseException as exc:  # noqa: BLE001 - handed to the loop thread
                    future.error = exc
                    batch.launch_done.set()
                future.done.set()

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _dummy_first() -> tuple[ScheduleBatch, FutureResult]:
    batch = ScheduleBatch(ForwardMode.DUMMY_FIRST, [])
    future = FutureResult(placeholders=[], result=ForwardResult(next_token_ids=[]))
    future.done.set()
    return batch, future


class OverlapLoop(EventLoop):
    name = "overlap"

    def __init__(self, scheduler: Any, pm: Any, config: Any = None) -> None:
        super().__init__(scheduler, pm, config)
        self.result_queue: collections.deque[tuple[ScheduleBatch, FutureResult]] = collections.deque()
        self.forward = ForwardThread(scheduler.worker, self.grad_mode)
        self.result_timeout_s = 600.0

    def has_pending(self) -> bool:
        return bool(self.result_queue) or self.scheduler.has_work

    def launch_batch(self, batch: ScheduleBatch) -> FutureResult:
        """The ``run_batch`` stage of this loop: hand the batch to the forward thread and
        commit its placeholders to the requests; returns at once."""
        s = self.scheduler
        fb = batch.to_forward_batch()
        if fb.output_ids:
            # Penalties: these are the requests' live output_ids, which commit_batch extends
            # below with this batch's own placeholders and resolve_batch rewrites; the forward
            # thread must see them as they are at launch.
            fb.output_ids = [None if ids is None else list(ids) for ids in fb.output_ids]
        if s._forward_hooks:
            s.pm.hook.loopserve_before_forward(batch=fb)
        future = self.forward.launch(fb, batch)
        s.commit_batch(batch, future.placeholders)
        batch.trace_context = getattr(self, "current_trace_context", None)
        return future

    def process_result(self, batch: ScheduleBatch, future: FutureResult) -> None:
        """The ``process_batch_result`` stage: wait for the real tokens and resolve them."""
        if batch.forward_mode is ForwardMode.DUMMY_FIRST:
            return
        s = self.scheduler
        result = future.wait(self.result_timeout_s)
        s.stats.num_forwards += 1
        s.stats.forward_time_s += result.forward_time_s
        if s._forward_hooks:
            s.pm.hook.loopserve_after_forward(batch=future.fb, result=result)
        s.resolve_batch(batch, result.next_token_ids)

    def iteration(self) -> bool:
        s = self.scheduler
        received = self.stage("recv_requests", s.recv_requests)
        self.stage("process_input_requests", s.process_input_requests, received)
        batch = self.stage("get_next_batch_to_run", s.get_next_batch_to_run)
        if batch is not None:
            if not self.result_queue:
                self.result_queue.append(_dummy_first())
            future = self.stage("run_batch", self.launch_batch, batch)
            self.result_queue.append((batch, future))
        # Process the previous batch's result while the one just launched computes.
        processed = len(self.result_queue) > (1 if batch is not None else 0)
        if processed:
            prev_batch, prev_future = self.result_queue.popleft()
            if batch is not None:
                # NOTE: freeing finished requests' KV must wait until batch N+1 has copied
                # what it reads (its inputs and table rows).
                batch.launch_done.wait(self.result_timeout_s)
            self.stage("process_batch_result", self.process_result, prev_batch, prev_future)
        if batch is None and not self.result_queue:
            self.stage("self_check_during_idle", s.self_check_during_idle)
        s.last_batch = batch
        return batch is not None or bool(received) or processed or bool(self.result_queue)

    def close(self) -> None:
        self.forward.close()


@hookimpl
def loopserve_register_loops():
    return {"overlap": OverlapLoop}
