"""Admission of waiting requests into one prefill batch under token and KV budgets.

Like SGLang's PrefillAdder: besides the pages a prompt needs now, each admission reserves an
estimate of how much the running requests will still grow (their remaining ``max_new_tokens``
times ``new_token_ratio``), so admitting new work rarely forces a retraction later. The ratio
starts high, decays with every decode step and jumps up when a retraction happens. No torch.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loopserve.core.sched.req import Req

if TYPE_CHECKING:  # pragma: no cover
    from loopserve.core.sched.scheduler import Scheduler


class AddResult(enum.Enum):
    ADDED = "added"
    CHUNKED = "chunked"  # admitted with only part of its prompt; nothing more fits this batch
    NO_TOKEN = "no_token"  # the batch's token budget is spent
    NO_MEMORY = "no_memory"  # the KV budget (with growth reserve) is spent
    NO_ROW = "no_row"  # max_running_requests reached


@dataclass
class PrefillAdder:
    sched: "Scheduler"
    new_token_ratio: float
    reqs: list[Req] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.sched
        self.page_size = s.page_size
        self.rem_input = s.max_prefill_tokens
        self.rem_chunk = s.chunked_prefill_size if s.chunked_prefill_size > 0 else None
        # Tokens the running requests will still need: their next token now, plus growth.
        self.reserved = sum(self.growth(r) for r in s.running)
        self.reserved += s.decode_reserve_pages() * self.page_size

    def growth(self, req: Req) -> int:
        remaining = req.sampling_params.max_new_tokens - len(req.output_ids)
        remaining = min(remaining, self.sched.context_len - req.seq_len)
        return math.ceil(max(remaining, 0) * self.new_token_ratio)

    def room(self) -> int:
        return self.sched.kv.available_pages() * self.page_size - self.reserved

    def add(self, req: Req) -> AddResult:
        s = self.sched
        if len(s.running) + len(self.reqs) >= s.max_running:
            return AddResult.NO_ROW
        matched_now = False
        reused = 0
        if not req.kv_pages:
            reused = s.kv.match_prefix(req)
            matched_now = True
        start = req.num_computed
        extend = req.seq_len - start
        chunked = False
        if self.rem_chunk is not None and extend > self.rem_chunk:
            if self.rem_chunk < 1:
                return self._reject(req, matched_now, AddResult.NO_TOKEN)
            extend, chunked = self.rem_chunk, True
        elif self.reqs and extend > self.rem_input:
            return self._reject(req, matched_now, AddResult.NO_TOKEN)
        need_pages = s.kv.allocator.pages_needed(len(req.kv_pages), start + extend)
        if not self.reqs and not s.running:
            # Alone: admit if the prompt and its next token fit at all (retraction and the
            # growth estimate only matter once others share the pool).
            with_next = s.kv.allocator.pages_needed(len(req.kv_pages), start + extend + 1)
            fits = with_next <= s.kv.available_pages()
        else:
            grow = 0 if chunked else self.growth(req) + self.page_size
            fits = need_pages * self.page_size + grow <= self.room()
        if not fits:
            return self._reject(req, matched_now, AddResult.NO_MEMORY)
        if req.req_pool_idx is None:
            req.req_pool_idx = s.kv.req_pool.alloc()
            assert req.req_pool_idx is not None, "a free row was checked above"
        pages = s.kv.alloc_pages(need_pages)
        assert pages is not None, "available pages were checked above"
        req.kv_pages.extend(pages)
        req.is_chunked = chunked
        if matched_now and req.schedule_time is None:
            # First admission: prompt tokens served from the cache instead of computed.
            req.num_cached_tokens = min(reused, len(req.input_ids))
            s.stats.num_cached_prompt_tokens += req.num_cached_tokens
        self.reqs.append(req)
        self.prefix_lens.append(start)
        self.extend_lens.append(extend)
        self.rem_input -= extend
        if self.rem_chunk is not None:
            self.rem_chunk -= extend
        if not chunked:
            self.reserved += self.growth(req) + self.page_size
        return AddResult.CHUNKED if chunked else AddResult.ADDED

    def _reject(self, req: Req, matched_now: bool, why: AddResult) -> AddResult:
        if matched_now:
            self.sched.kv.undo_match(req)
        return why
