"""The scheduler role of the pipeline-parallel loop (``PPLoop.scheduler_cls``).

Micro-batches in flight must not share a request: a decode step reads the token the previous
step sampled, and that token is still travelling through the other stages. SGLang gives each
micro-batch slot its own running batch; here one running set is kept and a decode batch is
formed only from requests whose last token is back (``in_flight`` counts, per request, the
micro-batches that will still sample a token for it). A prompt's next prefill chunk may follow
its previous chunk at once: it reads only KV, which every stage writes in micro-batch order.

Everything else (admission, KV slots, retraction, aborts) is the plain scheduler's: its
decisions travel with each ``ForwardBatch`` and every stage applies them in the same order.
"""

from __future__ import annotations

from typing import Any

from loopserve.core.sched.scheduler import Scheduler
from loopserve.core.sched.schedule_batch import ScheduleBatch
from loopserve.core.sched.req import Req


class PPScheduler(Scheduler):
    """Also spreads the running requests over the micro-batches: a decode micro-batch takes
    at most ``ceil(running / slots)`` requests (``slots = pp_size + parallel.pp_async_depth``,
    the micro-batches the loop keeps in flight), so a burst admitted in one prefill
    micro-batch fans out over every slot and every stage gets work, instead of one big
    micro-batch travelling down an otherwise idle pipeline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: dict[int, int] = {}  # id(req) -> micro-batches in flight sampling for it
        par = self.config.parallel
        self.slots = max(1, int(par.pp_size) + int(par.pp_async_depth))

    def _ready(self, req: Req) -> bool:
        return id(req) not in self.in_flight

    def commit_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        super().commit_batch(batch, tokens)
        flight = self.in_flight
        for req, pos in zip(batch.reqs, batch.out_positions):
            if pos is not None:
                flight[id(req)] = flight.get(id(req), 0) + 1

    def resolve_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        flight = self.in_flight
        for req, pos in zip(batch.reqs, batch.out_positions):
            if pos is not None:
                left = flight[id(req)] - 1
                if left:
                    flight[id(req)] = left
                else:
                    del flight[id(req)]
        super().resolve_batch(batch, tokens)

    def fail_batch(self, batch: ScheduleBatch, message: str, committed: bool) -> None:
        if committed:
            flight = self.in_flight
            for req, pos in zip(batch.reqs, batch.out_positions):
                if pos is not None and id(req) in flight:
                    if flight[id(req)] > 1:
                        flight[id(req)] -= 1
                    else:
                        del flight[id(req)]
        super().fail_batch(batch, message, committed)

    def decode_reserve_pages(self) -> int:
        p = self.page_size
        cap = -(-len(self.running) // self.slots)
        return min(cap, sum(1 for r in self.running if self._ready(r) and len(r.kv_pages) * p < r.seq_len))

    def _ensure_decode_pages(self) -> list[Req]:
        """The base rule, over the running requests whose last token is back."""
        while self.running and self.decode_reserve_pages() > self.kv.available_pages():
            if not self._retract_for_memory():
                break
        ctx, p, flight = self.context_len, self.page_size, self.in_flight
        reqs = [r for r in self.running
                if id(r) not in flight and r.finished_reason is None
                and len(r.output_ids) < r.sampling_params.max_new_tokens
                and len(r.input_ids) + len(r.output_ids) < ctx]
        cap = -(-len(self.running) // self.slots)
        del reqs[cap:]
        needy = [r for r in reqs if len(r.kv_pages) * p < len(r.input_ids) + len(r.output_ids)]
        if needy:
            pages = self.kv.alloc_pages(len(needy))
            assert pages is not None, "decode pages were reserved above"
            for req, page in zip(needy, pages):
                req.kv_pages.append(page)
        return reqs
