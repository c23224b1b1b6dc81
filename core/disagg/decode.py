"""The decode server's scheduler role: receive a prompt's KV and first token, then decode.

Queues, in order (SGLang's): **prealloc** (a receiver looks up the prefill server through its
bootstrap server; once found, KV pages for the prompt are reserved here and their ids sent to
the prefill server) -> **transfer** (wait until the pages and the first token have arrived) ->
**waiting-to-decode** (a request row is free) -> **running**, where the ordinary decode batches
continue from the transferred KV exactly as if the prompt had been computed here. A request
retracted under memory pressure goes to the ordinary waiting queue and is recomputed locally.

Two extra stages poll the queues once per loop iteration: ``process_prealloc_queue`` and
``process_transfer_queue``. A transfer with no progress for
``disaggregation.transfer_timeout_s`` (prefill server gone, transfer failed) fails the request
with an error and frees its reserved pages; other requests carry on.
"""

from __future__ import annotations

import time
from typing import Any

from loopserve.core.disagg.base import KVPoll
from loopserve.core.disagg.role import TransferRoleMixin
from loopserve.core.sched.forward_batch import ForwardMode
from loopserve.core.sched.prefill_adder import PrefillAdder
from loopserve.core.sched.req import Req
from loopserve.core.sched.scheduler import AbortReq, Scheduler
from loopserve.core.sched.schedule_batch import ScheduleBatch

__all__ = ["DecodeScheduler"]


class DecodeScheduler(TransferRoleMixin, Scheduler):
    role = "decode"
    extra_stages = ("process_prealloc_queue", "process_transfer_queue")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prealloc_queue: list[Req] = []
        self.transfer_queue: list[Req] = []
        self.waiting_to_decode: list[Req] = []
        self._receivers: dict[int, Any] = {}  # id(req) -> KVReceiver
        self._init_transfer()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running or self.waiting_to_decode)

    @property
    def has_transfers(self) -> bool:
        return bool(self.prealloc_queue or self.transfer_queue)

    def transfer_reqs(self) -> list[Req]:
        """Requests in the transfer queues (counted as waiting load by the server)."""
        return self.prealloc_queue + self.transfer_queue + self.waiting_to_decode

    # ---------------------------------------------------------------- input
    def process_input_requests(self, messages: list[Any]) -> None:
        """New requests get a receiver and go to the prealloc queue."""
        reqs = [m for m in messages if isinstance(m, Req)]
        super().process_input_requests([m for m in messages if not isinstance(m, Req)])
        for req in reqs:
            receiver = self.admit_transfer(req, self.kv_manager.make_receiver)
            if receiver is None:
                continue
            receiver.init()
            self._receivers[id(req)] = receiver
            self.prealloc_queue.append(req)
        self._flush_finished()

    def _apply_abort(self, msg: AbortReq) -> None:
        for queue in (self.prealloc_queue, self.transfer_queue, self.waiting_to_decode):
            for req in queue:
                if req.rid == msg.rid and not req.finished:
                    queue.remove(req)
                    self._drop(req, msg.message)
                    self._flush_finished()
                    return
        super()._apply_abort(msg)

    def _drop(self, req: Req, message: str) -> None:
        receiver = self._receivers.pop(id(req), None)
        if receiver is not None:
            receiver.abort()
        self._fail_transfer(req, message)

    # ---------------------------------------------------------------- extra stages
    def process_prealloc_queue(self) -> bool:
        """Reserve pages for requests whose prefill server was found, and tell it where they
        go. Pages are reserved only while the running requests keep room to grow."""
        if not self.prealloc_queue:
            return False
        keep, moved = [], False
        adder = PrefillAdder(self, self.new_token_ratio)
        for req in self.prealloc_queue:
            receiver = self._receivers[id(req)]
            state = receiver.poll()
            if state is KVPoll.Failed:
                del self._receivers[id(req)]
                receiver.abort()  # tell the other side, which may still be waiting
                self._fail_transfer(req, f"KV transfer failed: {receiver.failure_exception()}")
                moved = True
                continue
            if state is not KVPoll.WaitingForInput or keep:
                keep.append(req)  # first come, first served
                continue
            need = -(-len(req.input_ids) // self.page_size)
            alone = not (self.running or self.transfer_queue or self.waiting_to_decode)
            if alone:
                fits = need + 1 <= self.kv.available_pages()
            else:
                fits = (need + 1) * self.page_size + adder.growth(req) <= adder.room()
            pages = self.kv.alloc_pages(need) if fits else None
            if pages is None:
                keep.append(req)
                continue
            adder.reserved += adder.growth(req) + self.page_size
            req.kv_pages = pages
            receiver.send_metadata(pages)
            self.transfer_queue.append(req)
            moved = True
        self.prealloc_queue = keep
        self._flush_finished()
        return moved

    def process_transfer_queue(self) -> bool:
        """Requests whose KV arrived move to waiting-to-decode, then to running as rows
        free up; failed transfers abort theirs and free the reserved pages."""
        keep, moved = [], False
        for req in self.transfer_queue:
            receiver = self._receivers[id(req)]
            state = receiver.poll()
            if state is KVPoll.Success:
                del self._receivers[id(req)]
                aux = receiver.aux()
                self._end_transfer(req)
                req.output_ids = [int(aux[0])]
                req.num_computed = len(req.input_ids)
                self.waiting_to_decode.append(req)
                moved = True
            elif state is KVPoll.Failed:
                del self._receivers[id(req)]
                receiver.abort()  # tell the other side, which may still be waiting
                self._fail_transfer(req, f"KV transfer failed: {receiver.failure_exception()}")
                moved = True
            else:
                keep.append(req)
        self.transfer_queue = keep
        if self.waiting_to_decode:
            moved = self._start_decoding() or moved
        self._flush_finished()
        return moved

    def _start_decoding(self) -> bool:
        """Give transferred requests a row and put them in the running set; the first token
        (sampled by the prefill server) is checked for stop conditions like any other."""
        started = []
        while self.waiting_to_decode and len(self.running) < self.max_running:
            req = self.waiting_to_decode.pop(0)
            req.req_pool_idx = self.kv.req_pool.alloc()
            assert req.req_pool_idx is not None, "running is below max_running_requests"
            req.prefix_dirty = True  # the worker's table row is written by the first decode
            req.schedule_time = time.perf_counter()
            self.stats.num_prompt_tokens += len(req.input_ids)
            self.running.append(req)
            started.append(req)
        if not started:
            return False
        first = [r.output_ids[0] for r in started]
        batch = ScheduleBatch(ForwardMode.EXTEND, started, page_size=self.page_size)
        batch.out_positions = [0] * len(started)
        batch.epochs = [r.retract_epoch for r in started]
        self.resolve_batch(batch, first)
        return True

    # ---------------------------------------------------------------- idle / shutdown
    def self_check_during_idle(self) -> None:
        live = (self.running + self.waiting_queue + self.prealloc_queue + self.transfer_queue
                + self.waiting_to_decode)
        self.kv.check(live, idle=not live)
        if not live:
            self.new_token_ratio = self.init_new_token_ratio

    def shutdown(self, message: str = "the engine shut down") -> None:
        for req in self.prealloc_queue + self.transfer_queue + self.waiting_to_decode:
            self._drop(req, message)
        self.prealloc_queue.clear()
        self.transfer_queue.clear()
        self.waiting_to_decode.clear()
        super().shutdown(message)
        self._close_transfer()
