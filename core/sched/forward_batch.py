"""The plain-data description of one forward pass, handed from the scheduler to a worker.

The scheduler builds it from a ``ScheduleBatch``; a worker turns it into tensors. It holds
only Python lists so the scheduling core stays free of torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loopserve.core.sched.sampling_params import SamplingParams


class ForwardMode(enum.Enum):
    """What kind of forward a batch runs."""

    EXTEND = "extend"  # prefill: new prompt tokens (possibly after a cached prefix)
    DECODE = "decode"  # one new token per request
    MIXED = "mixed"  # a prefill chunk and running decodes in one batch
    IDLE = "idle"  # nothing to compute (keeps PP / disaggregated ranks in step)
    DUMMY_FIRST = "dummy_first"  # primes the overlap loop's result queue

    @property
    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    """Inputs of one forward pass over ``len(req_pool_indices)`` requests.

    Request ``i`` contributes ``extend_lens[i]`` new tokens at positions
    ``prefix_lens[i] .. prefix_lens[i] + extend_lens[i] - 1``; its earlier tokens are already in
    the KV cache at ``req_to_token[req_pool_indices[i], :prefix_lens[i]]`` (the worker's table).
    ``out_cache_loc`` gives the KV slot of every new token, in ``input_ids`` order; the worker
    writes them into its request-to-token table before attention.
    """

    forward_mode: ForwardMode
    req_pool_indices: list[int]
    input_ids: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    out_cache_loc: list[int]
    sampling_params: list[SamplingParams]
    # Requests whose last token of this pass should be sampled (False for a non-final
    # prefill chunk). The worker still returns one entry per request.
    need_sample: list[bool] = field(default_factory=list)
    # Tokens each request produced so far (for frequency/presence/repetition penalties) and
    # its prompt (repetition penalty covers both). Filled only for requests that need them.
    output_ids: list[list[int] | None] = field(default_factory=list)
    prompt_ids: list[list[int] | None] = field(default_factory=list)
    # Seeded requests: the seed for this step (derived from the request seed and the number
    # of tokens generated), so a seeded request reproduces regardless of batch company.
    step_seeds: list[int | None] = field(default_factory=list)
    # (request index in this batch, slots of positions 0 .. len(slots) - 1): rows of the
    # worker's request-to-token table to rewrite before this pass — a request admitted with
    # a cached prefix, or whose prefix pages were swapped for the cache's own copies.
    prefix_slots: list[tuple[int, list[int]]] = field(default_factory=list)
    # Prompt scoring (``SamplingParams.prompt_logprobs``), per request: None, or
    # ``(num_scored, next_id)``: the first ``num_scored`` tokens of this pass each get the
    # log-probability of the prompt token that follows them; the last of those is followed by
    # ``next_id`` (the first token of the next chunk) when it is the last of this pass. Empty
    # when no request asked.
    prompt_scores: list[tuple[int, int | None] | None] = field(default_factory=list)
    # Pipeline stages: the W3C traceparent of the traced loop iteration that launched this
    # micro-batch, so the other stages' spans join its trace (None: not traced).
    trace_context: str | None = None

    @property
    def batch_size(self) -> int:
        return len(self.req_pool_indices)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class ForwardResult:
    """Output of one forward pass: one sampled token per request (ignored where
    ``need_sample`` was False)."""

    next_token_ids: list[int]
    forward_time_s: float = 0.0
    # Only when some request asked for logprobs (``SamplingParams.logprobs``) and the worker
    # computes them; per request, None where not asked for: the sampled token's log-probability
    # under the model's distribution (before temperature and the other sampling transforms),
    # and the top ``logprobs`` alternatives as (token id, log-probability), best first.
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # Only when ``ForwardBatch.prompt_scores`` asked: per request, None or the scored prompt
    # tokens' log-probabilities (positions ``prefix_lens[i] + 1`` onwards) and their top
    # alternatives.
    prompt_logprobs: list[tuple[list[float], list[list[tuple[int, float]]]] | None] | None = None
