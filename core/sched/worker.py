"""The worker interface: what the scheduler needs from whatever runs a forward pass.

The model worker (torch) and the sim worker (a cost model) both satisfy it; plugins build
workers through ``loopserve_make_worker``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from loopserve.core.sched.forward_batch import ForwardBatch, ForwardResult


@runtime_checkable
class Worker(Protocol):
    """Runs forward passes.

    ``num_kv_slots`` is the size of the token-to-KV pool it allocated (a multiple of the page
    size); ``context_len`` the longest sequence it accepts; ``tokenizer`` may be None for
    workers without one (then requests must come as token ids).
    """

    context_len: int
    num_kv_slots: int
    vocab_size: int
    eos_token_ids: Any
    tokenizer: Any

    def forward_batch(self, fb: ForwardBatch) -> ForwardResult: ...

    def shutdown(self) -> None: ...
