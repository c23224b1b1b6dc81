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
    """Also spreads the running requests over ``pp_size`` groups: a decode micro-batch takes at
    most ``ceil(running / pp_size)`` requests, so a burst admitted in one prefill micro-batch
    fans out over every stage instead of one big micro-batch travelling down an otherwise idle
    pipeline.

    ``parallel.pp_async_depth = K`` lets a request be in up to ``K + 1`` micro-batches: its next
    decode step is scheduled while its previous token still travels, with a placeholder id
    that the pipeline's launch thread resolves (waiting for that token) just before stage 0
    runs. Stage 0 then starts a group's next step the moment its tokens are back, instead of
    after rank 0 has processed them and scheduled again. Among the requests that may run, those
    with fewer micro-batches in flight, then the longest waiting, go first, so the groups keep
    their turn.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # id(req) -> [micro-batches in flight that sample for it, launch number of the latest]
        self.in_flight: dict[int, list[int]] = {}
        par = self.config.parallel
        self.groups = max(1, int(par.pp_size))
        self.ahead = int(par.pp_async_depth)
        self._launches = 0

    def _eligible(self) -> list[Req]:
        flight, ahead = self.in_flight, self.ahead
        if ahead == 0:
            return [r for r in self.running if id(r) not in flight]
        reqs = [r for r in self.running if flight.get(id(r), (0,))[0] <= ahead]
        reqs.sort(key=lambda r: tuple(flight.get(id(r), (0, -1))))
        return reqs

    def commit_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        super().commit_batch(batch, tokens)
        flight, seq = self.in_flight, self._launches
        self._launches += 1
        for req, pos in zip(batch.reqs, batch.out_positions):
            if pos is not None:
                entry = flight.get(id(req))
                if entry is None:
                    flight[id(req)] = [1, seq]
                else:
                    entry[0] += 1
                    entry[1] = seq

    def _landed(self, batch: ScheduleBatch) -> None:
        flight = self.in_flight
        for req, pos in zip(batch.reqs, batch.out_positions):
            entry = flight.get(id(req)) if pos is not None else None
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del flight[id(req)]

    def resolve_batch(self, batch: ScheduleBatch, tokens: list[int]) -> None:
        self._landed(batch)
        super().resolve_batch(batch, tokens)

    def fail_batch(self, batch: ScheduleBatch, message: str, committed: bool) -> None:
        if committed:
            self._landed(batch)
        super().fail_batch(batch, message, committed)

    def decode_reserve_pages(self) -> int:
        p = self.page_size
        cap = -(-len(self.running) // self.groups)
        return min(cap, sum(1 for r in self._eligible() if len(r.kv_pages) * p < r.seq_len))

    def _ensure_decode_pages(self) -> list[Req]:
        """The base rule, over the requests that may take another step now."""
        while self.running and self.decode_reserve_pages() > self.kv.available_pages():
            if not self._retract_for_memory():
                break
        ctx, p = self.context_len, self.page_size
        reqs = [r for r in self._eligible()
                if r.finished_reason is None
                and len(r.output_ids) < r.sampling_params.max_new_tokens
                and len(r.input_ids) + len(r.output_ids) < ctx]
        del reqs[-(-len(self.running) // self.groups):]
        needy = [r for r in reqs if len(r.kv_pages) * p < len(r.input_ids) + len(r.output_ids)]
        if needy:
            pages = self.kv.alloc_pages(len(needy))
            assert pages is not None, "decode pages were reserved above"
            for req, page in zip(needy, pages):
                req.kv_pages.append(page)
        return reqs
