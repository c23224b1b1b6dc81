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

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode, ForwardResult
from loopserve.core.mem.budget import check_scheduler_bookkeeping
from loopserve.core.mem.kv_cache_manager import KVCacheManager, KVLeakError
from loopserve.core.mem.kv_pool import PagedAllocator, ReqToTokenPool
from loopserve.core.plugin_manager import PluginErrors, has_wrappers, plugin_errors
from loopserve.core.sched.policy import BatchingPolicy
from loopserve.core.sched.prefill_adder import AddResult, PrefillAdder
from loopserve.core.sched.req import FinishKind, Req
from loopserve.core.sched.schedule_batch import ScheduleBatch

__all__ = ["AbortReq", "Inbox", "KVLeakError", "Scheduler", "SchedulerStats"]


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

    def size(self) -> int:
        """Messages waiting (an unlocked peek; a racing put may not be counted yet)."""
        return len(self._items)

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
    num_prefill_tokens: int = 0  # prompt tokens computed by forwards (recomputation included)
    num_cached_prompt_tokens: int = 0  # prompt tokens reused from the radix cache
    num_prompt_tokens: int = 0  # prompt tokens of admitted requests
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_retractions: int = 0
    num_preemptions: int = 0
    num_forwards: int = 0
    forward_time_s: float = 0.0
    stage_time_s: dict[str, float] = field(default_factory=dict)
    # Contained plugin-hook exceptions (shared with the plugin manager, which records them).
    plugin_errors: PluginErrors = field(default_factory=PluginErrors)

    @property
    def num_plugin_errors(self) -> int:
        """Plugin-hook exceptions contained so far (the loop kept serving)."""
        return self.plugin_errors.total

    @property
    def cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens served from the prefix cache."""
        return self.num_cached_prompt_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


class Scheduler:
    """Owns the waiting queue, the running (decode) set, KV bookkeeping and the worker."""

    def __init__(self, config: Any, pm: Any, worker: Any, policy_cls: type[BatchingPolicy]) -> None:
        self.config = config
        self.pm = pm
        self.worker = worker
        self.tokenizer = getattr(worker, "tokenizer", None)
        self.page_size = int(config.kv_cache.page_size)
        self.context_len = int(worker.context_len)
        sc = config.scheduler
        self.max_running = int(sc.max_running_requests)
        self.max_prefill_tokens = int(sc.max_prefill_tokens)
        self.chunked_prefill_size = int(sc.chunked_prefill_size)
        self.enable_mixed_chunk = bool(sc.enable_mixed_chunk)
        self.init_new_token_ratio = float(sc.init_new_token_ratio)
        self.min_new_token_ratio = float(sc.min_new_token_ratio)
        self.new_token_ratio_decay = float(sc.new_token_ratio_decay)
        self.new_token_ratio = self.init_new_token_ratio
        check_scheduler_bookkeeping(int(worker.num_kv_slots) // self.page_size, self.max_running)
        self.kv = KVCacheManager(worker.num_kv_slots // self.page_size, self.page_size, self.max_running,
                                 radix_cache=bool(config.radix_cache))
        self.policy = policy_cls(params=dict(config.policy.get("params") or {}), scheduler=self)
        self.eos_token_ids = frozenset(getattr(worker, "eos_token_ids", ()) or ())

        self.inbox = Inbox()
        self.waiting_queue: list[Req] = []
        self.running: list[Req] = []
        self.last_batch: ScheduleBatch | None = None
        self.stats = SchedulerStats(plugin_errors=plugin_errors(pm))
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

    @property
    def allocator(self) -> PagedAllocator:
        return self.kv.allocator

    @property
    def req_pool(self) -> ReqToTokenPool:
        return self.kv.req_pool

    @property
    def tree_cache(self):  # noqa: ANN201 - RadixCache | None
        return self.kv.tree

    def kv_usage(self) -> float:
        """Share of KV pages held by requests (cached-but-evictable pages count as free)."""
        total = self.kv.num_pages
        return (total - self.kv.available_pages()) / total if total else 0.0

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
                self.kv.release(req)  # a chunked or retracted request may hold KV
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
        """A prefill batch if waiting requests fit (with the running decodes mixed in, in
        mixed-chunk mode), else the decode batch of the running requests."""
        self._drop_finished_running()
        batch = None
        # NOTE: a long prompt's chunks alternate with decode steps, so running requests keep
        # producing tokens while it is prefilled (mixed mode runs both in one batch instead).
        chunk_waits = (
            not self.enable_mixed_chunk
            and self.running
            and self.last_batch is not None
            and self.last_batch.forward_mode.is_extend
            and bool(self.waiting_queue)
            and self.waiting_queue[0].is_chunked
        )
        if not chunk_waits:
            batch = self._get_new_prefill_batch()
        if batch is not None and self.enable_mixed_chunk and self.running:
            batch = self._mix_in_decodes(batch)
        if batch is None and self.running:
            batch = self._prepare_decode_batch()
        self._flush_finished()
        self.last_batch = batch  # the next call's chunk_waits looks at it
        return batch

    def _drop_finished_running(self) -> None:
        if any(r.finished_reason is not None for r in self.running):
            keep = []
            for req in self.running:
                if req.finished:
                    self.kv.release(req)
                else:
                    keep.append(req)
            self.running = keep

    def _get_new_prefill_batch(self) -> ScheduleBatch | None:
        if not self.waiting_queue:
            return None
        ordered = self.policy.order(self.waiting_queue)
        # A request part-way through a chunked prefill holds KV and a request row: it goes
        # first whatever the policy says (as in SGLang), or a request the policy ranks higher
        # could take the row it still needs.
        if any(r.is_chunked for r in ordered):
            ordered = [r for r in ordered if r.is_chunked] + [r for r in ordered if not r.is_chunked]
        adder = PrefillAdder(self, self.new_token_ratio)
        for i, req in enumerate(ordered):
            result = adder.add(req)
            if i == 0 and result in (AddResult.NO_MEMORY, AddResult.NO_ROW):
                # The policy may preempt running requests for its first choice (priority):
                # retract its candidates one at a time until the request fits.
                for victim in self.policy.preempt_for(req, list(self.running)):
                    self._retract(victim)
                    self.stats.num_preemptions += 1
                    adder = PrefillAdder(self, self.new_token_ratio)
                    result = adder.add(req)
                    if result in (AddResult.ADDED, AddResult.CHUNKED):
                        break
            if result is not AddResult.ADDED:
                break
        if not adder.reqs:
            if not self.running and ordered:
                self._reject_unfittable(ordered[0])
            return None
        now = time.perf_counter()
        for req in adder.reqs:
            if req.schedule_time is None:
                req.schedule_time = now
                self.stats.num_prompt_tokens += len(req.input_ids)
        taken = {id(r) for r in adder.reqs}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in taken]
        return ScheduleBatch(ForwardMode.EXTEND, adder.reqs, adder.prefix_lens, adder.extend_lens, self.page_size)

    def _reject_unfittable(self, head: Req) -> None:
        """Nothing runs and the head of the queue still does not fit: it never will."""
        if self.kv.cached_pages and self.kv.tree is not None:
            return  # cached pages are being evicted for it; the next step retries
        self.waiting_queue.remove(head)
        self.kv.release(head, cache=False)
        head.finish(FinishKind.ABORT, message=(
            f"request needs {head.seq_len + 1} KV tokens but the cache holds "
            f"{self.allocator.num_slots}; raise kv_cache.num_tokens"))
        self.stats.num_aborted += 1
        self._notify(head)

    def decode_reserve_pages(self) -> int:
        """Pages the running requests need now for the KV of their newest token."""
        if self.page_size == 1:
            return len(self.running)
        return sum(1 for r in self.running if len(r.kv_pages) * self.page_size < r.seq_len)

    def _ensure_decode_pages(self) -> list[Req]:
        """The running requests that decode next, each with a slot for its newest token;
        retract when the pool is dry."""
        while self.running and self.decode_reserve_pages() > self.kv.available_pages():
            if not self._retract_for_memory():
                break
        ctx, p = self.context_len, self.page_size
        # Those that can still produce a token that counts (with the overlap loop an
        # unresolved token may already sit at the end of output_ids). This runs every step
        # over every running request, hence plain attribute reads in one comprehension.
        reqs = [r for r in self.decode_candidates()
                if r.finished_reason is None and len(r.output_ids) < r.sampling_params.max_new_tokens
                and len(r.input_ids) + len(r.output_ids) < ctx]
        cap = self.decode_batch_cap()
        if cap is not None:
            del reqs[cap:]
        # A decode step adds one token, so a request needs at most one new page; one
        # allocation serves the whole batch.
        needy = [r for r in reqs if len(r.kv_pages) * p < len(r.input_ids) + len(r.output_ids)]
        if needy:
            pages = self.kv.alloc_pages(len(needy))
            assert pages is not None, "decode pages were reserved above"
            for req, page in zip(needy, pages):
                req.kv_pages.append(page)
        return reqs

    def decode_candidates(self) -> list[Req]:
        """The running requests that may decode in the next batch (a pipeline scheduler leaves
        out those whose token is still in flight)."""
        return self.running

    def decode_batch_cap(self) -> int | None:
        """At most this many requests per decode batch (None: all); a pipeline scheduler
        spreads the running requests over its micro-batches."""
        return None

    def _prepare_decode_batch(self) -> ScheduleBatch | None:
        reqs = self._ensure_decode_pages()
        if not reqs:
            return None
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.new_token_ratio_decay)
        return ScheduleBatch(ForwardMode.DECODE, reqs, [r.num_computed for r in reqs], [1] * len(reqs),
                             self.page_size)

    def _mix_in_decodes(self, batch: ScheduleBatch) -> ScheduleBatch:
        """Mixed-chunk mode: one batch with the prefill part first, then every running decode."""
        reqs = self._ensure_decode_pages()
        if not reqs:
            return batch
        return ScheduleBatch(
            ForwardMode.MIXED,
            batch.reqs + reqs,
            batch.prefix_lens + [r.num_computed for r in reqs],
            batch.extend_lens + [1] * len(reqs),
            self.page_size,
            num_prefill_reqs=len(batch.reqs),
        )

    def _retract_for_memory(self) -> bool:
        """Retract the running request with the fewest generated tokens back to the queue.

        Its computed KV goes to the prefix cache (evictable) and it is recomputed from
        prompt + outputs when readmitted, so nothing is lost and greedy outputs are unchanged.
        """
        if len(self.running) <= 1:
            # A request part-way through a chunked prefill may hold the memory the last
            # running request needs: it gives its KV back and restarts later (its computed
            # prefix stays cached), rather than the running request being aborted.
            chunked = next((r for r in self.waiting_queue if r.is_chunked and r.kv_pages), None)
            if chunked is not None:
                self.kv.release(chunked)
                chunked.is_chunked = False
                chunked.num_retractions += 1
                self.stats.num_retractions += 1
                self.new_token_ratio = min(1.0, max(self.new_token_ratio, self.init_new_token_ratio) + 0.1)
                return True
            if self.running:
                req = self.running.pop()
                req.finish(FinishKind.ABORT, message=(
                    f"the sequence grew to {req.seq_len} tokens, more than the KV cache holds "
                    f"({self.allocator.num_slots}); raise kv_cache.num_tokens"))
                self.stats.num_aborted += 1
                self.kv.release(req)
                self._notify(req)
            return False
        victim = min(self.running, key=lambda r: (len(r.output_ids), -r.arrival_time))
        self._retract(victim)
        # Growth was underestimated: be more conservative for a while.
        self.new_token_ratio = min(1.0, max(self.new_token_ratio, self.init_new_token_ratio) + 0.1)
        return True

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        # An in-flight token (overlap loop) is dropped and recomputed after readmission.
        req.drop_placeholders()
        req.retract_epoch += 1
        req.num_computed = min(req.num_computed, req.seq_len)
        self.kv.release(req)
        req.num_retractions += 1
        self.stats.num_retractions += 1
        self.waiting_queue.insert(0, req)

    # ---------------------------------------------------------------- stage 4
    def run_batch(self, batch: ScheduleBatch) -> ForwardResult:
        """Run the forward pass of ``batch`` on the worker, synchronously. Asynchronous loops
        launch through their runner instead (``core/loop/runner.py``), which calls
        ``prepare_forward`` and ``record_forward`` around the launch."""
        fb = self.prepare_forward(batch)
        t0 = time.perf_counter()
        result = self.worker.forward_batch(fb)
        if not result.forward_time_s:
            result.forward_time_s = time.perf_counter() - t0
        self.record_forward(fb, result)
        return result

    def prepare_forward(self, batch: ScheduleBatch) -> ForwardBatch:
        """The worker's view of ``batch``, after the ``loopserve_before_forward`` hooks."""
        fb = batch.to_forward_batch()
        if self._forward_hooks:
            self.pm.hook.loopserve_before_forward(batch=fb)
        return fb

    def record_forward(self, fb: ForwardBatch, result: ForwardResult) -> None:
        """Count a finished forward and call the ``loopserve_after_forward`` hooks."""
        self.stats.num_forwards += 1
        self.stats.forward_time_s += result.forward_time_s
        if self._forward_hooks:
            self.pm.hook.loopserve_after_forward(batch=fb, result=result)

    def fail_batch(self, batch: ScheduleBatch, message: str, committed: bool) -> None:
        """The forward of ``batch`` raised: abort its requests with ``message`` and free their
        KV (not cached: what the failed forward wrote is not trusted). Other requests go on.

        :param committed: whether ``commit_batch`` already ran for it (asynchronous launch).
        """
        failed = [r for r in batch.reqs if not r.finished]
        for req in failed:
            req.finish(FinishKind.ABORT, message=message)
            self.stats.num_aborted += 1
        gone = {id(r) for r in batch.reqs}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in gone]
        self.running = [r for r in self.running if id(r) not in gone]
        for req in batch.reqs:
            self.kv.release(req, cache=False)
        if committed and self.kv.tree is not None and batch.forward_mode is not ForwardMode.DECODE:
            # Prompts of this batch went into the prefix cache at launch; drop what is unlocked.
            self.kv.tree.evict(self.kv.tree.evictable_pages)
        for req in failed:
            self._notify(req)
        self._flush_finished()

    # ---------------------------------------------------------------- stage 5
    def process_batch_result(self, batch: ScheduleBatch, result: ForwardResult) -> None:
        """Append sampled tokens, check stop conditions, stream, free finished requests."""
        self.commit_batch(batch, result.next_token_ids)
        self.resolve_batch(batch, result.next_token_ids)

    def commit_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        """Advance request state past a launched batch: KV computed, the new token's place in
        ``output_ids`` (a real id, or the overlap loop's negative placeholder), prefilled
        requests to the running set, unfinished chunks back to the queue head."""
        if batch.forward_mode is ForwardMode.DECODE:
            self._commit_decode(batch, tokens)
            return
        num_prefill = batch.num_prefill_reqs
        positions: list[int | None] = []
        partial: list[Req] = []
        for i, (req, n) in enumerate(zip(batch.reqs, batch.extend_lens)):
            req.num_computed += n
            if i < num_prefill:
                self.stats.num_prefill_tokens += n
            if req.num_computed < req.seq_len:
                partial.append(req)  # a non-final prefill chunk: nothing to sample
                positions.append(None)
                continue
            req.is_chunked = False
            positions.append(len(req.output_ids))
            req.output_ids.append(tokens[i])
        batch.out_positions = positions
        batch.epochs = [r.retract_epoch for r in batch.reqs]
        if num_prefill:
            for req in partial[::-1]:
                self.kv.cache_unfinished(req)
                self.waiting_queue.insert(0, req)  # its next chunk goes first
            is_partial = {id(r) for r in partial}
            for req in batch.reqs[:num_prefill]:
                if id(req) not in is_partial:
                    # Share the prompt's KV with later requests while this one decodes.
                    self.kv.cache_unfinished(req)
                    self.running.append(req)

    def _commit_decode(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        """``commit_batch`` for a decode batch: every request computed its newest token and
        gets one output (no chunks, no admissions)."""
        positions: list[int | None] = []
        for req, token in zip(batch.reqs, tokens):
            req.num_computed += 1
            out = req.output_ids
            positions.append(len(out))
            out.append(token)
        batch.out_positions = positions
        batch.epochs = [r.retract_epoch for r in batch.reqs]

    def resolve_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        """The batch's real tokens are known: store them, check stop conditions, stream, and
        free what finished. A request that finished or was retracted after the launch gets
        nothing (the overlap loop's extra step is discarded here)."""
        now = time.perf_counter()
        stats = self.stats
        finish_hook = self._finish_hook
        check_stop = self.check_stop
        for req, pos, epoch, token in zip(batch.reqs, batch.out_positions, batch.epochs, tokens):
            if pos is None or req.finished_reason is not None or req.retract_epoch != epoch:
                continue
            token = int(token)
            req.output_ids[pos] = token
            stats.num_generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            n_out = pos + 1
            if check_stop(req, token, n_out):
                del req.output_ids[n_out:]
                stats.num_finished += 1
                if finish_hook:
                    self._finished_buffer.append(req)
            # NOTE: after the counters: a caller woken here may read them at once.
            if req.on_update is not None:
                req.on_update(req)
        self._drop_finished_running()
        self._flush_finished()

    def check_stop(self, req: Req, token: int, n_out: int) -> bool:
        """The one place stop conditions are checked: finish ``req`` if its ``n_out``-th
        output ``token`` ends it (stop token, EOS, max_new_tokens, a stop string, a full
        context); True if it finished."""
        sp = req.sampling_params
        if token in sp.stop_token_ids:
            req.finish(FinishKind.STOP, token)
        elif not sp.ignore_eos and token in req.eos_token_ids:
            req.finish(FinishKind.STOP, token)
        elif n_out >= sp.max_new_tokens:
            req.finish(FinishKind.LENGTH)
        elif sp.stop and self._check_stop_strings(req, n_out):
            pass
        elif len(req.input_ids) + n_out >= self.context_len:
            req.finish(FinishKind.LENGTH)  # the context is full
        else:
            return False
        return True

    def _check_stop_strings(self, req: Req, upto: int) -> bool:
        """Finish ``req`` if a stop string ends in its first ``upto`` outputs; True if so."""
        stops = req.sampling_params.stop
        if self.tokenizer is None:
            return False
        longest = max(len(s) for s in stops)
        # Byte-level tokens can split a character, so look back a few tokens per character.
        tail_ids = req.output_ids[max(0, upto - (4 * longest + 4)) : upto]
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=False)
        for s in stops:
            if s in tail:
                req.finish(FinishKind.STOP, s)
                return True
        return False

    # ---------------------------------------------------------------- stage 6
    def self_check_during_idle(self) -> None:
        """Verify the KV books (free + cached + in use == total; no rows or cache locks held
        with nothing live) and reset per-burst state. Raises ``KVLeakError`` on a leak."""
        live = self.running + self.waiting_queue
        self.kv.check(live, idle=not live)
        if not live:
            self.new_token_ratio = self.init_new_token_ratio

    # ---------------------------------------------------------------- helpers
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
            self.kv.release(req, cache=False)
        self.waiting_queue.clear()
        self.running.clear()
        for msg in self.inbox.drain():
            if isinstance(msg, Req) and not msg.finished:
                msg.finish(FinishKind.ABORT, message=message)
                self._notify(msg)
        self._flush_finished()
