"""A request as the scheduler sees it: prompt, outputs, KV ownership, timing and finish state.

Part of the scheduling core: no torch.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from loopserve.core.sched.sampling_params import SamplingParams


class FinishKind(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens (or the context length) reached
    ABORT = "abort"  # aborted by the client or rejected by the scheduler


@dataclass(frozen=True)
class FinishReason:
    kind: FinishKind
    matched: int | str | None = None  # the stop token id or stop string that matched
    message: str | None = None  # why an abort happened

    def __str__(self) -> str:
        return self.kind.value


@dataclass(eq=False)  # identity: requests are compared as objects, never by value
class Req:
    """One generation request.

    KV bookkeeping: the request owns ``kv_pages`` (page ids in the token-to-KV pool); token ``i``
    of its sequence (prompt then outputs) lives in slot ``kv_pages[i // P] * P + i % P``.
    ``num_computed`` tokens have their KV in the cache.
    """

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    # Called with the request whenever it produced tokens or finished (Engine / server).
    on_update: Callable[["Req"], None] | None = None
    traceparent: str | None = None
    priority: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Disaggregated serving: the prefill server's bootstrap address and the room pairing the
    # prefill and decode halves of this request (a ``loopserve.core.disagg.BootstrapAddr``).
    bootstrap: Any = None

    # --- scheduler state
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    finished_reason: FinishReason | None = None
    num_retractions: int = 0
    # The retraction epoch: bumped on retraction, so results of batches launched before it
    # (still in flight in an asynchronous loop) are ignored.
    retract_epoch: int = 0
    # A chunked prefill whose later chunks are still to come.
    is_chunked: bool = False
    # Radix cache: the first ``num_tree_pages`` of ``kv_pages`` belong to the cache (locked
    # through ``cache_node``); the rest are the request's own. ``prefix_dirty`` asks the next
    # forward to rewrite the worker's table row for the cached prefix.
    num_tree_pages: int = 0
    cache_node: Any = None
    prefix_dirty: bool = False
    num_cached_tokens: int = 0  # prompt tokens reused from the cache (first admission)

    # --- timing (time.perf_counter() values)
    arrival_time: float = field(default_factory=time.perf_counter)
    wall_arrival_time: float = field(default_factory=time.time)
    schedule_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def seq_len(self) -> int:
        """Tokens of the sequence so far (prompt + outputs)."""
        return len(self.input_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def finish(self, kind: FinishKind, matched: int | str | None = None, message: str | None = None) -> None:
        if self.finished_reason is None:
            self.finished_reason = FinishReason(kind, matched, message)
            self.finish_time = time.perf_counter()
            self.drop_placeholders()

    def drop_placeholders(self) -> None:
        """Remove trailing not-yet-resolved output tokens (the overlap loop's negative future
        ids): a finished or retracted request keeps only tokens that really exist."""
        while self.output_ids and self.output_ids[-1] < 0:
            self.output_ids.pop()
