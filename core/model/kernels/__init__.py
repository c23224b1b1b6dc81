"""Triton kernels over the paged KV cache, each next to the launcher that checks its inputs.

- ``decode_attention``: one query token per request, split-K over the context (two passes:
  partial softmax per split, then a merge), query heads of a GQA group share one K/V load.
- ``extend_attention``: prefill / chunked prefill with a cached prefix plus causal new tokens,
  requests of different lengths in one launch.
- ``kv_store``: writes a layer's new K and V into their cache slots in one launch.
- ``rmsnorm``: RMSNorm with the residual add fused in.

The kernels read each key's slot from the request-to-token table (``req_to_token[row, pos]``),
so any ``kv_cache.page_size`` works: a page is just a run of consecutive slots.

Whether the kernels run compiled (CUDA) or in Triton's interpreter (``TRITON_INTERPRET=1``,
on CPU tensors) is fixed when they are decorated, i.e. when their modules (and triton itself)
are first imported: the variable must be set before the process imports triton.
``interpreted()`` says which it was.
"""

from __future__ import annotations

import os


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter now (before any kernel import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreted() -> bool:
    """Whether the kernels were (or, if not imported yet, would be) built for the interpreter
    — and triton's own library functions (``tl.zeros`` & co., decorated when triton was first
    imported) too: interpreted kernels cannot call compiled library functions."""
    import triton.language.standard as tl_standard

    from loopserve.core.model.kernels import decode_attention

    return decode_attention.INTERPRETED and type(tl_standard.zeros).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (tl.arange needs a power-of-two length)."""
    return 1 << max(0, (n - 1).bit_length())
