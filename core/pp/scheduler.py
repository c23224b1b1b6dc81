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
    after rank 0 has processed them and scheduled again. The requests then travel in groups
    that keep their turn (``_eligible``).
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
        back: list[Req] = []
        by_seq: dict[int, list[Req]] = {}
        in_flight_groups = set()
        for r in self.running:
            entry = flight.get(id(r))
            if entry is None:
                back.append(r)
                continue
            in_flight_groups.add(entry[1])
            if entry[0] <= ahead:
                by_seq.setdefault(entry[1], []).append(r)
        # Requests travel in groups, one per micro-batch, pp_size groups in all (as SGLang's
        # per-slot running batches). A micro-batch that took requests from two in-flight
        # micro-batches would wait for the later one, and stage 0 starts micro-batches in
        # order, so every launch behind it would wait as well. So a micro-batch takes the
        # oldest group whole, except: with fewer than pp_size groups, requests with nothing
        # in flight form a new one, or the oldest group gives its first `cap` requests to
        # one; a group half again as large as `cap` is split the same way (requests finish
        # unevenly); with more than pp_size groups (a burst of prompts, a split), the two
        # oldest merge. Spare room is topped up with requests that have nothing in flight.
        cap, groups = self._cap(), len(in_flight_groups)
        if back and groups < self.groups:
            return back[:cap]
        seqs = sorted(by_seq)
        reqs = by_seq[seqs[0]] if seqs else []
        if groups < self.groups or len(reqs) > cap + cap // 2:
            reqs = reqs[:cap]
        elif len(seqs) > 1 and groups > self.groups:
            reqs = reqs + by_seq[seqs[1]]
        return reqs + back[:max(0, cap - len(reqs))]

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
        """Pages for the next decode micro-batch: the first ``cap`` eligible requests at most,
        or, with an async depth, exactly the eligible ones (a group is never cut to the cap,
        so its batch may be larger)."""
        p = self.page_size
        needy = sum(1 for r in self._eligible() if len(r.kv_pages) * p < r.seq_len)
        return needy if self.ahead else min(self._cap(), needy)

    def decode_candidates(self) -> list[Req]:
        """Only requests whose last token is back (a micro-batch never holds one twice)."""
        return self._eligible()

    def decode_batch_cap(self) -> int | None:
        """One micro-batch's share of the running requests (ceil(running / groups)); with
        an async depth ``decode_candidates`` applies it, and never splits a group."""
        return self._cap() if self.ahead == 0 else None

    def _cap(self) -> int:
        return -(-len(self.running) // self.groups)
