"""``ScheduleBatch``: the requests chosen for one forward pass and how many tokens each adds.

The scheduler builds it; ``to_forward_batch`` flattens it into the plain lists a worker reads.
No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardMode
from loopserve.core.mem.kv_pool import slots_for
from loopserve.core.sched.req import Req


@dataclass
class ScheduleBatch:
    forward_mode: ForwardMode
    reqs: list[Req]
    # Per request: tokens already in the KV cache, and new tokens computed by this pass.
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)
    page_size: int = 1
    # Requests [0, num_prefill_reqs) are prefill (extend) work; the rest decode. Defaults
    # to all for EXTEND and none for DECODE; MIXED batches set it.
    num_prefill_reqs: int = -1
    # Filled by Scheduler.commit_batch: where each request's new token goes in its
    # output_ids (None for a non-final chunk) and each request's retraction epoch at launch.
    out_positions: list[int | None] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_prefill_reqs < 0:
            self.num_prefill_reqs = len(self.reqs) if self.forward_mode is ForwardMode.EXTEND else 0

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    def is_empty(self) -> bool:
        return not self.reqs

    def to_forward_batch(self) -> ForwardBatch:
        if self.forward_mode is ForwardMode.DECODE:
            return self._decode_forward_batch()
        input_ids: list[int] = []
        out_cache_loc: list[int] = []
        need_sample: list[bool] = []
        output_ids: list[list[int] | None] = []
        prompt_ids: list[list[int] | None] = []
        step_seeds: list[int | None] = []
        prefix_slots: list[tuple[int, list[int]]] = []
        prompt_scores: list[tuple[int, int | None] | None] = []
        any_penalty = any_scores = False
        for i, (req, start, n) in enumerate(zip(self.reqs, self.prefix_lens, self.extend_lens)):
            end = start + n
            if req.prefix_dirty:
                prefix_slots.append((i, slots_for(req.kv_pages, self.page_size, 0, start)))
                req.prefix_dirty = False
            input_ids.extend(token_slice(req, start, end))
            out_cache_loc.extend(slots_for(req.kv_pages, self.page_size, start, end))
            # A non-final prefill chunk computes KV only; its sample would be meaningless.
            need_sample.append(end == req.seq_len)
            sp = req.sampling_params
            if sp.needs_output_ids:
                any_penalty = True
                output_ids.append(req.output_ids)
                prompt_ids.append(req.input_ids)
            else:
                output_ids.append(None)
                prompt_ids.append(None)
            # Seeded sampling depends only on the request's seed and its output position.
            step_seeds.append(None if sp.seed is None else step_seed(sp.seed, len(req.output_ids)))
            # A prompt scored once: not again when a retracted request recomputes it.
            if sp.prompt_logprobs is not None and not req.output_ids:
                prompt_len = len(req.input_ids)
                scored = max(0, min(end, prompt_len - 1) - start)
                prompt_scores.append((scored, req.input_ids[end] if end < prompt_len else None))
                any_scores = True
            else:
                prompt_scores.append(None)
        return ForwardBatch(
            forward_mode=self.forward_mode,
            req_pool_indices=[r.req_pool_idx for r in self.reqs],  # type: ignore[misc]
            input_ids=input_ids,
            prefix_lens=list(self.prefix_lens),
            extend_lens=list(self.extend_lens),
            out_cache_loc=out_cache_loc,
            sampling_params=[r.sampling_params for r in self.reqs],
            need_sample=need_sample,
            output_ids=output_ids if any_penalty else [],
            prompt_ids=prompt_ids if any_penalty else [],
            step_seeds=step_seeds,
            prefix_slots=prefix_slots,
            prompt_scores=prompt_scores if any_scores else [],
        )

    def _decode_forward_batch(self) -> ForwardBatch:
        """``to_forward_batch`` for a decode batch: one new token per request, the last of its
        sequence, at position ``prefix_lens[i]``. The same lists as the general path, built
        with one comprehension each (this runs every decode step over every running request)."""
        reqs = self.reqs
        positions = self.prefix_lens
        p = self.page_size
        if p == 1:
            out_cache_loc = [r.kv_pages[pos] for r, pos in zip(reqs, positions)]
        else:
            out_cache_loc = [r.kv_pages[pos // p] * p + pos % p for r, pos in zip(reqs, positions)]
        # NOTE: a decode request has sampled at least once (its prefill did), so its newest
        # token is the last output token.
        input_ids = [r.output_ids[-1] for r in reqs]
        prefix_slots = []
        for i, r in enumerate(reqs):
            if r.prefix_dirty:
                prefix_slots.append((i, slots_for(r.kv_pages, p, 0, positions[i])))
                r.prefix_dirty = False
        sps = [r.sampling_params for r in reqs]
        output_ids: list[list[int] | None] = []
        prompt_ids: list[list[int] | None] = []
        if any(sp.needs_output_ids for sp in sps):
            output_ids = [r.output_ids if sp.needs_output_ids else None for r, sp in zip(reqs, sps)]
            prompt_ids = [r.input_ids if sp.needs_output_ids else None for r, sp in zip(reqs, sps)]
        step_seeds: list[int | None] = []
        if any(sp.seed is not None for sp in sps):
            step_seeds = [None if sp.seed is None else step_seed(sp.seed, len(r.output_ids))
                          for r, sp in zip(reqs, sps)]
        return ForwardBatch(
            forward_mode=self.forward_mode,
            req_pool_indices=[r.req_pool_idx for r in reqs],  # type: ignore[misc]
            input_ids=input_ids,
            prefix_lens=list(positions),
            extend_lens=list(self.extend_lens),
            out_cache_loc=out_cache_loc,
            sampling_params=sps,
            need_sample=[True] * len(reqs),
            output_ids=output_ids,
            prompt_ids=prompt_ids,
            step_seeds=step_seeds,
            prefix_slots=prefix_slots,
        )


def step_seed(seed: int, num_outputs: int) -> int:
    """The sampling seed of a seeded request's next token: it depends only on the request's
    seed and how many tokens it has produced, never on the batch it runs in."""
    return (seed * 1_000_003 + num_outputs) % (2**63)


def token_slice(req: Req, start: int, end: int) -> list[int]:
    """Tokens ``start .. end - 1`` of prompt + outputs, without concatenating the two lists."""
    n = len(req.input_ids)
    if end <= n:
        return req.input_ids[start:end]
    if start >= n:
        return req.output_ids[start - n : end - n]
    return req.input_ids[start:] + req.output_ids[: end - n]
