"""``Runner``: executes a loop's batches with a given number of batches in flight.

Depth 0 runs each batch's forward inline and its result is processed in the same iteration
(the normal loop). Depth 1 launches batch N+1 and then processes batch N's result while N+1
computes (the overlap loop). Depth N keeps N batches in flight (a pipeline of N stages). The
loops do not re-implement any of this; they compose a runner (``RunnerLoop`` in ``base.py``).

Asynchronous launches hand out placeholder token ids, ``-(k + 1)`` for the k-th sampled token,
which the scheduler commits to the requests at launch (``Scheduler.commit_batch``) and which
the next batch's inputs may carry. The executor resolves them from a ring of recent tokens
just before the forward that reads them (``LaunchJob.run``), and sets the entry's
``launch_done`` once the inputs are copied, so state the launched batch reads is not freed
under it. Results are processed in launch order (``due``), each with ``resolve_batch``.

A worker may offer ``launch_batch(fb, job)``: it arranges for ``job.run(forward)`` to be called
on its own execution thread (the model worker's compute thread), so an asynchronous launch
costs no extra thread hop. Any other worker gets a ``ForwardThread`` that calls its synchronous
``forward_batch``.

When the queue is empty, the first asynchronous launch is preceded by a ``DUMMY_FIRST`` entry
(a result with nothing in it), so every iteration that launches also processes one entry: the
pipeline is primed exactly as in the design this project follows.

A forward that raises fails only the requests of its batch (``Scheduler.fail_batch``), with an
error that names the exception; the loop keeps serving the others.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from loopserve.core.loop.grad_mode import grad_context
from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode, ForwardResult
from loopserve.core.sched.schedule_batch import ScheduleBatch

log = logging.getLogger(__name__)

__all__ = ["ForwardThread", "FutureMap", "InFlight", "LaunchJob", "Runner"]


class FutureMap:
    """Placeholder ids and the ring of the real tokens they stand for.

    Ids are handed out consecutively, so one batch's tokens are one slice of the ring (storing
    a result is one slice assignment: between two forwards the device waits for it). The ring
    holds ``capacity`` tokens; entries still referenced must fit in it (``Runner`` checks).
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self._ring: list[int] = [0] * capacity
        self._next = 0

    def allocate(self, n: int) -> list[int]:
        first = self._next
        self._next += n
        return list(range(-first - 1, -first - n - 1, -1))

    def resolve(self, ids: list[int]) -> list[int]:
        ring, cap = self._ring, self.capacity
        return [ring[(-t - 1) % cap] if t < 0 else t for t in ids]

    def store(self, placeholders: list[int], tokens: list[int]) -> None:
        if not placeholders:
            return
        ring, cap = self._ring, self.capacity
        start = (-placeholders[0] - 1) % cap
        end = start + len(tokens)
        if end <= cap:
            ring[start:end] = tokens
        else:
            ring[start:] = tokens[: cap - start]
            ring[: end - cap] = tokens[cap - start:]


@dataclass(eq=False)
class InFlight:
    """A launched batch: its placeholders now, its real tokens once ``done`` is set."""

    batch: ScheduleBatch
    fb: ForwardBatch | None = None
    placeholders: list[int] = field(default_factory=list)
    launch_done: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: ForwardResult | None = None
    error: BaseException | None = None

    def wait(self, timeout: float | None) -> ForwardResult:
        if not self.done.wait(timeout):
            raise TimeoutError(f"the forward pass gave no result within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class LaunchJob:
    """What an executor runs for one launch: resolve the inputs, forward, store the tokens."""

    __slots__ = ("entry", "futures")

    def __init__(self, entry: InFlight, futures: FutureMap) -> None:
        self.entry, self.futures = entry, futures

    @property
    def fb(self) -> ForwardBatch:
        assert self.entry.fb is not None
        return self.entry.fb

    def run(self, forward: Callable[[ForwardBatch], ForwardResult]) -> None:
        """Call on the executor's thread; never raises (errors go to the entry)."""
        entry, futures = self.entry, self.futures
        fb = entry.fb
        assert fb is not None
        try:
            fb.input_ids = futures.resolve(fb.input_ids)
            if fb.output_ids:
                fb.output_ids = [None if ids is None else futures.resolve(ids) for ids in fb.output_ids]
            # NOTE: from here on the batch's inputs are copied; its KV rows may be freed.
            entry.launch_done.set()
            t0 = time.perf_counter()
            result = forward(fb)
            if not result.forward_time_s:  # a worker that does not time itself
                result.forward_time_s = time.perf_counter() - t0
            futures.store(entry.placeholders, list(result.next_token_ids))
            entry.result = result
        except BaseException as exc:  # noqa: BLE001 - handed to the loop thread
            # Later batches may refer to these placeholders; give them a defined value.
            futures.store(entry.placeholders, [0] * len(entry.placeholders))
            entry.error = exc
            entry.launch_done.set()
        entry.done.set()


class ForwardThread:
    """Runs launch jobs in order on a thread of its own, for workers without ``launch_batch``."""

    def __init__(self, grad_mode: str) -> None:
        self.grad_mode = grad_mode
        self._queue: queue.SimpleQueue[tuple[LaunchJob, Callable[..., Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loopserve-forward", daemon=True)
        self._thread.start()

    def submit(self, job: LaunchJob, forward: Callable[[ForwardBatch], ForwardResult]) -> None:
        self._queue.put((job, forward))

    def _run(self) -> None:
        with grad_context(self.grad_mode):  # grad mode is per thread
            while True:
                item = self._queue.get()
                if item is None:
                    return
                job, forward = item
                job.run(forward)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


_DONE = threading.Event()
_DONE.set()  # never cleared: the done/launch_done of every entry that ran inline


def _dummy_first() -> InFlight:
    return InFlight(ScheduleBatch(ForwardMode.DUMMY_FIRST, []), result=ForwardResult(next_token_ids=[]),
                    launch_done=_DONE, done=_DONE)


class Runner:
    """Launches a loop's batches and hands back their results in order, ``depth`` behind."""

    def __init__(self, scheduler: Any, depth: int, *, grad_mode: str = "no_grad",
                 result_timeout_s: float = 600.0, futures: FutureMap | None = None) -> None:
        if depth < 0:
            raise ValueError(f"a runner's depth must be >= 0, got {depth}")
        self.scheduler = scheduler
        self.depth = depth
        self.result_timeout_s = result_timeout_s
        self.queue: collections.deque[InFlight] = collections.deque()
        self.futures = futures or FutureMap()
        self._last_launched: InFlight | None = None
        self.forward_thread: ForwardThread | None = None
        worker = scheduler.worker
        self._async_launch = getattr(worker, "launch_batch", None) if depth > 0 else None
        if depth > 0 and self._async_launch is None:
            self.forward_thread = ForwardThread(grad_mode)

    @property
    def pending(self) -> bool:
        """Launched batches whose results are not processed yet."""
        return bool(self.queue)

    def launch(self, batch: ScheduleBatch) -> InFlight:
        """The ``run_batch`` stage: run (depth 0) or launch (depth > 0) ``batch`` and commit
        its tokens, real or placeholder, to the requests."""
        s = self.scheduler
        if self.depth == 0:
            # Ran inline: the entry is done at once (shared, already-set events: no per-step
            # Event objects on the normal loop's hot path).
            entry = InFlight(batch, launch_done=_DONE, done=_DONE)
            try:
                entry.result = s.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - fails this batch only (see process)
                entry.error = exc
            if entry.result is not None:
                s.commit_batch(batch, entry.result.next_token_ids)
            self.queue.append(entry)
            return entry
        fb = s.prepare_forward(batch)
        if fb.output_ids:
            # Penalties read the requests' live output_ids, which commit_batch extends below
            # with this batch's placeholders and resolve_batch rewrites; copy them as they are.
            fb.output_ids = [None if ids is None else list(ids) for ids in fb.output_ids]
        n = fb.batch_size
        # NOTE: every entry still in flight may be referenced; all must fit in the ring.
        assert (self.depth + 1) * n <= self.futures.capacity, "batch too large for the future-token ring"
        if not self.queue:
            self.queue.append(_dummy_first())
        entry = InFlight(batch, fb, self.futures.allocate(n))
        job = LaunchJob(entry, self.futures)
        if self._async_launch is not None:
            self._async_launch(fb, job)
        else:
            assert self.forward_thread is not None
            self.forward_thread.submit(job, s.worker.forward_batch)
        s.commit_batch(batch, entry.placeholders)
        self.queue.append(entry)
        self._last_launched = entry
        return entry

    def due(self, launched: bool) -> list[InFlight]:
        """The entries whose results the loop processes now, oldest first: while batches keep
        coming, all but the newest ``depth``; with nothing launched, one (draining)."""
        q = self.queue
        if launched:
            n = len(q) - self.depth
        else:
            n = 1 if q else 0
        if n <= 0:
            return []
        out = [q.popleft() for _ in range(n)]
        newest = self._last_launched
        if launched and newest is not None and self.depth > 0:
            # NOTE: freeing finished requests' KV must wait until the batch just launched
            # has copied what it reads (its inputs and table rows).
            newest.launch_done.wait(self.result_timeout_s)
        return out

    def process(self, batch: ScheduleBatch, entry: InFlight) -> None:
        """The ``process_batch_result`` stage: wait for the real tokens and resolve them (or
        fail the batch's requests if its forward raised)."""
        if batch.forward_mode is ForwardMode.DUMMY_FIRST:
            return
        s = self.scheduler
        try:
            result = entry.wait(self.result_timeout_s)
        except TimeoutError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the worker's error, this batch only
            log.error("forward pass of a %d-request batch failed: %r", batch.batch_size, exc)
            s.fail_batch(batch, f"the forward pass failed: {exc!r}", committed=self.depth > 0)
            return
        if entry.fb is not None:  # launched asynchronously: count and report it now
            s.record_forward(entry.fb, result)
        s.resolve_batch(batch, result.next_token_ids)

    def close(self) -> None:
        if self.forward_thread is not None:
            self.forward_thread.close()

    @property
    def alive(self) -> bool:
        """Whether a forward thread of this runner is still running."""
        return self.forward_thread is not None and self.forward_thread.alive
