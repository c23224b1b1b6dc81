"""The scheduler: queues, KV bookkeeping and the six stages that every event loop drives.

``recv_requests`` -> ``process_input_requests`` -> ``get_next_batch_to_run`` -> ``run_batch`` ->
``process_batch_result``, and ``self_check_during_idle`` when there was no batch. Loops decide
how these are sequenced and overlapped; the scheduler decides what runs. The scheduling logic
here (queues, admission, allocator bookkeeping) does not import torch; the worker does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loopserve.core.forward_batch import ForwardMode, ForwardResult
from loopserve.core.kv_pool import PagedAllocator, ReqToTokenPool
from loopserve.core.plugin_manager import has_wrappers
from loopserve.core.policy import BatchingPolicy
from loopserve.core.req import FinishKind, Req
from loopserve.core.schedule_batch import ScheduleBatch


class KVLeakError(RuntimeError):
    """KV pages or request rows are unaccounted for while the scheduler is idle."""


@dataclass(frozen=True)
class AbortReq:
    rid: str
    message: str = "aborted by the client"


class Inbox:
    """Thread-safe message queue between the API side and the loop, with an idle wait."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        # NOTE: a wake() that lands before the loop starts waiting must not be lost (a stop()
        # during an idle iteration would otherwise sleep out the whole idle timeout).
        self._woken = False

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def put_many(self, items: list[Any]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()

    def drain(self) -> list[Any]:
        if not self._items:  # cheap unlocked peek; a racing put is seen next step
            return []
        with self._cond:
            items = list(self._items)
            self._items.clear()
        return items

    def wait(self, timeout: float) -> bool:
        with self._cond:
            if not self._items and not self._woken:
                self._cond.wait(timeout)
            self._woken = False
            return bool(self._items)

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()


@dataclass
class SchedulerStats:
    num_prefill_tokens: int = 0  # prompt tokens computed by forwards
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_retractions: int = 0
    num_forwards: int = 0
    forward_time_s: float = 0.0
    stage_time_s: dict[str, float] = field(default_factory=dict)


class Scheduler:
    """Owns the waiting queue, the running (decode) set, KV bookkeeping and the worker."""

    def __init__(self, config: Any, pm: Any, worker: Any, policy_cls: type[BatchingPolicy]) -> None:
        self.config = config
        self.pm = pm
        self.worker = worker
        self.tokenizer = getattr(worker, "tokenizer", None)
        self.page_size = int(config.kv_cache.page_size)
        self.context_len = int(worker.context_len)
        num_pages = worker.num_kv_slots // self.page_size
        self.allocator = PagedAllocator(num_pages, self.page_size)
        self.max_running = int(config.scheduler.max_running_requests)
        self.req_pool = ReqToTokenPool(self.max_running)
        self.max_prefill_tokens = int(config.scheduler.max_prefill_tokens)
        self.policy = policy_cls(params=dict(config.policy.get("params") or {}), scheduler=self)
        self.eos_token_ids = frozenset(getattr(worker, "eos_token_ids", ()) or ())

        self.inbox = Inbox()
        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self.last_batch: ScheduleBatch | None = None
        self.stats = SchedulerStats()
        self._finish_hook = has_wrappers(pm.hook.loopserve_requests_finished)
        self._finished_buffer: list[Req] = []
        self._forward_hooks = has_wrappers(pm.hook.loopserve_before_forward) or has_wrappers(
            pm.hook.loopserve_after_forward
        )

    # ---------------------------------------------------------------- API side (any thread)

    def submit(self, *reqs: Req) -> None:
        """Queue requests; those of one call arrive in the same step."""
        self.inbox.put_many(list(reqs))

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        self.inbox.put(AbortReq(rid, message))

    def wait_for_work(self, timeout: float) -> bool:
        return self.inbox.wait(timeout)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running)

    # ---------------------------------------------------------------- stage 1
    def recv_requests(self) -> list[Any]:
        """Take new requests and control messages, without blocking."""
        return self.inbox.drain()

    # ---------------------------------------------------------------- stage 2
    def process_input_requests(self, messages: list[Any]) -> None:
        """Validate new requests into the waiting queue; apply aborts."""
        for msg in messages:
            if isinstance(msg, AbortReq):
                self._apply_abort(msg)
                continue
            req: Req = msg
            if not req.eos_token_ids:
                req.eos_token_ids = self.eos_token_ids
            error = self.validate_request(req)
            if error is not None:
                req.finish(FinishKind.ABORT, message=error)
                self.stats.num_aborted += 1
                self._notify(req)
                continue
            self.waiting_queue.append(req)
        self._flush_finished()

    def validate_request(self, req: Req) -> str | None:
        """Why ``req`` cannot run, or None. The Engine and server check the same first, so
        this is the last line for requests from other frontends."""
        n = len(req.input_ids)
        if n == 0:
            return "the prompt is empty; send at least one token"
        if n >= self.context_len:
            return (f"the prompt has {n} tokens but the model's context length is {self.context_len}; "
                    "shorten the prompt")
        if -(-(n + 1) // self.page_size) > self.allocator.num_pages:
            return (f"the prompt has {n} tokens but the KV cache holds only "
                    f"{self.allocator.num_slots}; raise kv_cache.num_tokens")
        return None

    def _apply_abort(self, msg: AbortReq) -> None:
        for i, req in enumerate(self.waiting_queue):
            if req.rid == msg.rid:
                del self.waiting_queue[i]
                self._release(req)  # a retracted request may hold nothing, but be sure
                req.finish(FinishKind.ABORT, message=msg.message)
                self.stats.num_aborted += 1
                self._notify(req)
                return
        for req in self.running:
            if req.rid == msg.rid and not req.finished:
                # Freed by the next get_next_batch_to_run, after any in-flight use.
                req.finish(FinishKind.ABORT, message=msg.message)
                self.stats.num_aborted += 1
                self._notify(req)
                return

    # ---------------------------------------------------------------- stage 3
    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        """A prefill batch if new requests fit, else the decode batch of running requests."""
        self._drop_finished_running()
        batch = self._get_new_prefill_batch()
        if batch is None and self.running:
            batch = self._prepare_decode_batch()
        self._flush_finished()
        return batch

    def _drop_finished_running(self) -> None:
        if any(r.finished for r in self.running):
            keep = []
            for req in self.running:
                if req.finished:
                    self._release(req)
                else:
                    keep.append(req)
            self.running = keep

    def _get_new_prefill_batch(self) -> ScheduleBatch | None:
        if not self.waiting_queue or self.req_pool.num_free == 0:
            return None
        ordered = self.policy.order(self.waiting_queue)
        admitted: list[Req] = []
        prefix_lens: list[int] = []
        extend_lens: list[int] = []
        budget = self.max_prefill_tokens
        for req in ordered:
            if len(self.running) + len(admitted) >= self.max_running:
                break
            start = req.num_computed
            n = req.seq_len - start
            if admitted and n > budget:
                break
            # Keep room for every running request's next decode token.
            pages = self.allocator.pages_needed(len(req.kv_pages), req.seq_len + 1)
            if pages > self.allocator.num_free - self._decode_reserve_pages():
                break
            if req.req_pool_idx is None:
                req.req_pool_idx = self.req_pool.alloc()
                assert req.req_pool_idx is not None
            new_pages = self.allocator.alloc(self.allocator.pages_needed(len(req.kv_pages), req.seq_len))
            assert new_pages is not None
            req.kv_pages.extend(new_pages)
            if req.schedule_time is None:
                req.schedule_time = time.perf_counter()
            admitted.append(req)
            prefix_lens.append(start)
            extend_lens.append(n)
            budget -= n
        if not admitted:
            if not self.running and ordered:
                # Nothing runs and the head still does not fit: it never will.
                head = ordered[0]
                self.waiting_queue.remove(head)
                head.finish(FinishKind.ABORT, message=(
                    f"request needs {head.seq_len + 1} KV tokens but the cache holds "
                    f"{self.allocator.num_slots}; raise kv_cache.num_tokens"))
                self.stats.num_aborted += 1
                self._notify(head)
            return None
        taken = {id(r) for r in admitted}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in taken]
        return ScheduleBatch(ForwardMode.EXTEND, admitted, prefix_lens, extend_lens, self.page_size)

    def _decode_reserve_pages(self) -> int:
        """Pages the running requests need for their next token (one each at a page edge)."""
        if self.page_size == 1:
            return len(self.running)
        # The newest token (position seq_len - 1) has no KV yet; it needs a page when the
        # request's pages end exactly before it.
        return sum(1 for r in self.running if len(r.kv_pages) * self.page_size < r.seq_len)

    def _prepare_decode_batch(self) -> ScheduleBatch | None:
        # Each running request needs a slot for its newest token; retract when the pool is dry.
        while True:
            need = [r for r in self.running if len(r.kv_pages) * self.page_size < r.seq_len]
            if len(need) <= self.allocator.num_free:
                break
            if not self._retract_one():
                break
        for req in self.running:
            if len(req.kv_pages) * self.page_size < req.seq_len:
                pages = self.allocator.alloc(1)
                assert pages is not None
                req.kv_pages.extend(pages)
        if not self.running:
            return None
        reqs = list(self.running)
        return ScheduleBatch(
            ForwardMode.DECODE,
            reqs,
            [r.num_computed for r in reqs],
            [1] * len(reqs),
            self.page_size,
        )

    def _retract_one(self) -> bool:
        """Retract the running request with the fewest generated tokens back to the queue.

        Its KV is freed; it is recomputed later from prompt + outputs, so nothing is lost.
        """
        if len(self.running) <= 1:
            if self.running:
                req = self.running.pop()
                req.finish(FinishKind.ABORT, message=(
                    f"the sequence grew to {req.seq_len} tokens, more than the KV cache holds "
                    f"({self.allocator.num_slots}); raise kv_cache.num_tokens"))
                self.stats.num_aborted += 1
                self._release(req)
                self._notify(req)
            return False
        victim = min(self.running, key=lambda r: (len(r.output_ids), -r.arrival_time))
        self.running.remove(victim)
        self._release(victim)
        victim.num_retractions += 1
        self.stats.num_retractions += 1
        self.waiting_queue.insert(0, victim)
        return True

    # ---------------------------------------------------------------- stage 4
    def run_batch(self, batch: ScheduleBatch) -> ForwardResult:
        """Run the forward pass of ``batch`` on the worker."""
        fb = batch.to_forward_batch()
        if self._forward_hooks:
            self.pm.hook.loopserve_before_forward(batch=fb)
        t0 = time.perf_counter()
        result = self.worker.forward_batch(fb)
        elapsed = time.perf_counter() - t0
        self.stats.num_forwards += 1
        self.stats.forward_time_s += result.forward_time_s or elapsed
        if self._forward_hooks:
            self.pm.hook.loopserve_after_forward(batch=fb, result=result)
        return result

    # ---------------------------------------------------------------- stage 5
    def process_batch_result(self, batch: ScheduleBatch, result: ForwardResult) -> None:
        """Append sampled tokens, check stop conditions, stream, free finished requests."""
        now = time.perf_counter()
        is_extend = batch.forward_mode.is_extend
        partial: list[Req] = []
        for req, n, token in zip(batch.reqs, batch.extend_lens, result.next_token_ids):
            req.num_computed += n
            if is_extend:
                self.stats.num_prefill_tokens += n
            if req.num_computed < req.seq_len:
                partial.append(req)  # a non-final prefill chunk
                continue
            if req.finished:
                continue  # aborted while in flight: its token is discarded
            req.output_ids.append(int(token))
            self.stats.num_generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            req.check_token_finish(int(token))
            if not req.finished and req.sampling_params.stop:
                self._check_stop_strings(req)
            if not req.finished and req.seq_len >= self.context_len:
                req.finish(FinishKind.LENGTH)
            if req.finished:
                self.stats.num_finished += 1
            self._notify(req)
        if is_extend:
            for req in partial[::-1]:
                if req.finished:
                    self._release(req)
                else:
                    self.waiting_queue.insert(0, req)  # its next chunk goes first
            for req in batch.reqs:
                if req in partial:
                    continue
                if req.finished:
                    self._release(req)
                else:
                    self.running.append(req)
        else:
            self._drop_finished_running()
        self._flush_finished()

    def _check_stop_strings(self, req: Req) -> None:
        stops = req.sampling_params.stop
        if self.tokenizer is None:
            return
        longest = max(len(s) for s in stops)
        # Byte-level tokens can split a character, so look back a few tokens per character.
        tail_ids = req.output_ids[-(4 * longest + 4):]
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=False)
        for s in stops:
            if s in tail:
                req.finish(FinishKind.STOP, s)
                return

    # ---------------------------------------------------------------- stage 6
    def self_check_during_idle(self) -> None:
        """With nothing running, every KV page and request row must be free again."""
        in_use = sum(len(r.kv_pages) for r in self.running) + sum(len(r.kv_pages) for r in self.waiting_queue)
        total = self.allocator.num_pages
        free = self.allocator.num_free
        cached = 0
        if free + cached + in_use != total:
            raise KVLeakError(
                f"KV leak: free {free} + cached {cached} + in use {in_use} != total {total} pages")
        if not self.running and not self.waiting_queue and self.req_pool.num_free != self.req_pool.size:
            raise KVLeakError(
                f"request-row leak: {self.req_pool.size - self.req_pool.num_free} rows held while idle")

    # ---------------------------------------------------------------- helpers
    def _release(self, req: Req) -> None:
        if req.kv_pages:
            self.allocator.free(req.kv_pages)
            req.kv_pages = []
        req.num_computed = 0
        if req.req_pool_idx is not None:
            self.req_pool.free(req.req_pool_idx)
            req.req_pool_idx = None

    def _notify(self, req: Req) -> None:
        if req.on_update is not None:
            req.on_update(req)
        if self._finish_hook and req.finished:
            self._finished_buffer.append(req)

    def _flush_finished(self) -> None:
        """One ``loopserve_requests_finished`` call for everything that finished this stage."""
        if self._finished_buffer:
            reqs, self._finished_buffer = self._finished_buffer, []
            self.pm.hook.loopserve_requests_finished(scheduler=self, reqs=reqs)

    def shutdown(self, message: str = "the engine shut down") -> None:
        """Abort everything still queued or running and free its memory."""
        for req in self.waiting_queue + self.running:
            if not req.finished:
                req.finish(FinishKind.ABORT, message=message)
                self._notify(req)
            self._release(req)
        self.waiting_queue.clear()
        self.running.clear()
        for msg in self.inbox.drain():
            if isinstance(msg, Req) and not msg.finished:
                msg.finish(FinishKind.ABORT, message=message)
                self._notify(msg)
        self._flush_finished()
