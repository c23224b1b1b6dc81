"""The prefill server's scheduler role: compute prompts, send their KV to a decode server.

Queues, in order (SGLang's): **bootstrap** (a sender is made for the request's room and waits
until the decode server has reserved pages and said where they go) -> **waiting** (the
ordinary prefill admission: chunking, radix prefix reuse, token and KV budgets) -> the prefill
forward -> **inflight** (the prompt's pages and the first sampled token are handed to the
sender; the request holds its KV until the decode server confirms, then finishes and frees
it). Nothing ever decodes here: ``running`` stays empty.

Two extra stages poll the queues once per loop iteration: ``process_bootstrap_queue`` and
``process_inflight_queue``. A transfer that makes no progress for
``disaggregation.transfer_timeout_s`` fails the request and frees its KV (a dead decode
server costs nothing after the timeout).
"""

from __future__ import annotations

import time
from typing import Any

from loopserve.core.disagg.base import KVPoll
from loopserve.core.disagg.role import TransferRoleMixin
from loopserve.core.sched.forward_batch import ForwardMode
from loopserve.core.sched.req import FinishKind, Req
from loopserve.core.sched.scheduler import AbortReq, Scheduler
from loopserve.core.sched.schedule_batch import ScheduleBatch

__all__ = ["PrefillScheduler"]


class PrefillScheduler(TransferRoleMixin, Scheduler):
    role = "prefill"
    #: Stages the disaggregated loops run after ``process_input_requests``.
    extra_stages = ("process_bootstrap_queue", "process_inflight_queue")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bootstrap_queue: list[Req] = []
        self.inflight_queue: list[Req] = []
        self._senders: dict[int, Any] = {}  # id(req) -> KVSender
        self._init_transfer()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.running)

    @property
    def has_transfers(self) -> bool:
        return bool(self.bootstrap_queue or self.inflight_queue)

    def transfer_reqs(self) -> list[Req]:
        """Requests in the transfer queues (counted as waiting load by the server)."""
        return self.bootstrap_queue + self.inflight_queue

    @property
    def bootstrap_port(self) -> int | None:
        """The port the bootstrap server listens on (the real one when configured as 0)."""
        server = getattr(self.kv_manager, "bootstrap", None)
        return None if server is None else int(server.port)

    # ---------------------------------------------------------------- input
    def process_input_requests(self, messages: list[Any]) -> None:
        """New requests go to the bootstrap queue (with a sender for their room), not to
        waiting; aborts reach them in every queue."""
        reqs = [m for m in messages if isinstance(m, Req)]
        super().process_input_requests([m for m in messages if not isinstance(m, Req)])
        for req in reqs:
            sender = self.admit_transfer(req, self.kv_manager.make_sender)
            if sender is None:
                continue
            self._senders[id(req)] = sender
            self.bootstrap_queue.append(req)
        self._flush_finished()

    def _apply_abort(self, msg: AbortReq) -> None:
        for queue in (self.bootstrap_queue, self.inflight_queue):
            for req in queue:
                if req.rid == msg.rid and not req.finished:
                    queue.remove(req)
                    self._drop(req, msg.message)
                    return
        for req in self.waiting_queue:
            if req.rid == msg.rid:
                self.waiting_queue.remove(req)
                self._drop(req, msg.message)
                return

    def _drop(self, req: Req, message: str) -> None:
        sender = self._senders.pop(id(req), None)
        if sender is not None:
            sender.abort()
        self._fail_transfer(req, message)
        self._flush_finished()

    # ---------------------------------------------------------------- extra stages
    def process_bootstrap_queue(self) -> bool:
        """Requests whose decode server has reserved their pages move on to waiting."""
        if not self.bootstrap_queue:
            return False
        keep, moved = [], False
        for req in self.bootstrap_queue:
            sender = self._senders[id(req)]
            state = sender.poll()
            if state is KVPoll.Failed:
                del self._senders[id(req)]
                sender.abort()  # tell the other side, which may still be waiting
                self._fail_transfer(req, f"KV transfer failed: {sender.failure_exception()}")
                moved = True
            elif state is KVPoll.Bootstrapping:
                keep.append(req)
            else:
                sender.init(self._num_prompt_pages(req))
                self.waiting_queue.append(req)
                moved = True
        self.bootstrap_queue = keep
        self._flush_finished()
        return moved

    def process_inflight_queue(self) -> bool:
        """Requests whose KV the decode server confirmed finish (their KV goes to the prefix
        cache); failed transfers abort theirs."""
        if not self.inflight_queue:
            return False
        keep, moved = [], False
        for req in self.inflight_queue:
            sender = self._senders[id(req)]
            if not req.output_ids or req.output_ids[-1] < 0:
                keep.append(req)  # the first token is not known yet (overlap)
                continue
            state = sender.poll()
            if state is KVPoll.Success:
                del self._senders[id(req)]
                req.finish(FinishKind.LENGTH)
                self.stats.num_finished += 1
                self.kv.release(req)
                self._end_transfer(req)
                self._notify(req)
                moved = True
            elif state is KVPoll.Failed:
                del self._senders[id(req)]
                sender.abort()  # tell the other side, which may still be waiting
                self._fail_transfer(req, f"KV transfer failed: {sender.failure_exception()}")
                moved = True
            else:
                keep.append(req)
        self.inflight_queue = keep
        self._flush_finished()
        return moved

    def _num_prompt_pages(self, req: Req) -> int:
        return -(-len(req.input_ids) // self.page_size)

    # ---------------------------------------------------------------- batches
    def commit_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        """As ``Scheduler.commit_batch``, but a request whose prompt is complete goes to the
        inflight queue instead of decoding here. Its table row is given back at once: the
        forwards run in launch order, so later batches may reuse it."""
        super().commit_batch(batch, tokens)
        if self.running:
            for req in self.running:
                if req.req_pool_idx is not None:
                    self.kv.req_pool.free(req.req_pool_idx)
                    req.req_pool_idx = None
                self.inflight_queue.append(req)
            self.running = []

    def resolve_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        """The first tokens are known: store them and hand pages + token to the senders. No
        stop checks here; the decode server applies them to the token it receives."""
        assert batch.forward_mode is not ForwardMode.DECODE, "a prefill server never decodes"
        now = time.perf_counter()
        for req, pos, epoch, token in zip(batch.reqs, batch.out_positions, batch.epochs, tokens):
            if pos is None or req.finished_reason is not None or req.retract_epoch != epoch:
                continue
            token = int(token)
            req.output_ids[pos] = token
            self.stats.num_generated_tokens += 1
            req.first_token_time = now
            sender = self._senders.get(id(req))
            if sender is not None:
                sender.send(req.kv_pages[: self._num_prompt_pages(req)], [token])
            if req.on_update is not None:
                req.on_update(req)
        self._flush_finished()

    def fail_batch(self, batch: ScheduleBatch, message: str, committed: bool) -> None:
        """A failed prefill forward: its requests' transfers are abandoned too."""
        gone = {id(r) for r in batch.reqs}
        self.inflight_queue = [r for r in self.inflight_queue if id(r) not in gone]
        for req in batch.reqs:
            sender = self._senders.pop(id(req), None)
            if sender is not None:
                sender.abort()
            self._end_transfer(req)
        super().fail_batch(batch, message, committed)

    def _reject_unfittable(self, head: Req) -> None:
        if self.inflight_queue:
            return  # KV held by transfers comes back when they finish
        super()._reject_unfittable(head)

    # ---------------------------------------------------------------- idle / shutdown
    def self_check_during_idle(self) -> None:
        live = self.running + self.waiting_queue + self.inflight_queue + self.bootstrap_queue
        self.kv.check(live, idle=not live)
        if not live:
            self.new_token_ratio = self.init_new_token_ratio

    def shutdown(self, message: str = "the engine shut down") -> None:
        for req in self.bootstrap_queue + self.inflight_queue:
            sender = self._senders.pop(id(req), None)
            if sender is not None:
                sender.abort()
            self._fail_transfer(req, message)
        self.bootstrap_queue.clear()
        self.inflight_queue.clear()
        super().shutdown(message)
        self._close_transfer()
